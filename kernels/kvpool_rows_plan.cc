// The mode 4 encoder's planning (kvpool_rows_plan.h): the sample, each head's basis, outlier
// channels and steps, and the model behind each row's number of planes.
#include "kernels/kvpool_rows_plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace kvpool::kernels::kvpool::internal {
namespace {

constexpr double kCoefStep = 3.0;      // Coefficient step / the residual's typical step.
constexpr double kOutlierRatio = 4.0;  // Outlier: residual variance above 4x the median.
// Bits a low-rank direction costs per channel (its basis codes) and per token (its
// coefficient, about), against which the rank is chosen.
constexpr double kBasisBits = 8.0, kCoefBits = 6.0;

// Mean squared error per unit variance of a row with b planes (a Gaussian at HalfStep(b)).
constexpr double kDistortion[kMaxPlanes + 1] = {
    1.0,     0.3634,  0.1188,  0.03744,  0.01154, 0.00349, 0.00104, 0.000306,
    8.9e-05, 2.3e-05, 6.5e-06, 1.84e-06, 5.3e-07, 1.5e-07, 4.3e-08, 1.2e-08};

struct Tables {
  double bit[kMaxPlanes];    // A row takes plane k + 1 when mu * w * sigma^2 >= bit[k].
  double weight[kClasses];   // Token class k's weight, 2^(k / 2).
  double scale[kMaxPlanes];  // Scale index thresholds per unit^2: 2^((k - 7.5) / 2).
};
const Tables& GetTables() {
  static const Tables t = [] {
    Tables t;
    for (uint32_t k = 0; k < kMaxPlanes; ++k) {
      t.bit[k] = 1.0 / (kDistortion[k] - kDistortion[k + 1]);
      t.scale[k] = std::exp2((double(k) - 7.5) / 2);
    }
    for (uint32_t k = 0; k < kClasses; ++k) t.weight[k] = std::exp2(k / 2.0);
    return t;
  }();
  return t;
}

// nearbyint for |x| < 2^22 (round to nearest even in the default rounding mode), without the
// library call a baseline x86-64 build makes for std::nearbyint.
inline float RoundNearest(float x) { return (x + 0x1.8p23f) - 0x1.8p23f; }

// Sign matrix of the sketch, Omega(n, j) for n < kSketchRows, j < kMaxRank, computed once.
constexpr uint32_t kSketchRows = 1024;
const float* SketchSigns() {
  static const std::vector<float> signs = [] {
    std::vector<float> w(uint64_t{kSketchRows} * kMaxRank);
    for (uint32_t n = 0; n < kSketchRows; ++n)
      for (uint32_t j = 0; j < kMaxRank; ++j) w[n * kMaxRank + j] = float(Omega(n, j));
    return w;
  }();
  return signs.data();
}

// The sample's low-rank directions: a sketched subspace iteration (kmax random sign
// combinations of the rows, one power iteration, Gram-Schmidt twice) and the eigen-decomposition
// of the rows' Gram matrix in that subspace, strongest first: up to kmax rows of `dirs` (k x D)
// with their variances per row, and each row's projections proj[n * k + j]. The products go
// through the row kernels.
void SampleBasis(const RowKernels& rk, const float* xs, uint32_t count, uint32_t D, uint32_t kmax,
                 std::vector<float>* dirs, std::vector<double>* variances,
                 std::vector<float>* proj) {
  std::vector<float> w(uint64_t{count} * kmax), s(kmax * D, 0.f), q(kmax * D, 0.f), y(kmax);
  const float* signs = SketchSigns();
  for (uint32_t n = 0; n < count; ++n)
    for (uint32_t j = 0; j < kmax; ++j) {
      w[n * kmax + j] = n < kSketchRows ? signs[n * kMaxRank + j] : float(Omega(n, j));
    }
  rk.accumulate(xs, D, count, w.data(), kmax, D, s.data());
  rk.dot(xs, D, count, s.data(), kmax, D, w.data());  // One power iteration.
  std::fill(s.begin(), s.end(), 0.f);
  rk.accumulate(xs, D, count, w.data(), kmax, D, s.data());
  uint32_t k = 0;  // Classical Gram-Schmidt twice into q.
  for (uint32_t j = 0; j < kmax; ++j) {
    float* v = &s[j * D];
    float norm0, norm;
    rk.dot(v, D, 1, v, 1, D, &norm0);
    for (int pass = 0; pass < 2 && k > 0; ++pass) {
      rk.dot(q.data(), D, k, v, 1, D, y.data());
      for (uint32_t i = 0; i < k; ++i) y[i] = -y[i];
      rk.accumulate(q.data(), D, k, y.data(), 1, D, v);
    }
    rk.dot(v, D, 1, v, 1, D, &norm);
    if (!(norm > 1e-12f * norm0) || !(norm > 0) || !std::isfinite(norm)) continue;
    const float inv = 1.f / std::sqrt(norm);
    for (uint32_t d = 0; d < D; ++d) q[k * D + d] = v[d] * inv;
    ++k;
  }
  dirs->clear();
  variances->clear();
  if (k == 0) return;
  std::vector<float> c(uint64_t{count} * k), ct(uint64_t{k} * count), g(uint64_t{k} * k);
  rk.dot(xs, D, count, q.data(), k, D, c.data());
  for (uint32_t n = 0; n < count; ++n)
    for (uint32_t a = 0; a < k; ++a) ct[a * count + n] = c[n * k + a];
  rk.dot(ct.data(), count, k, ct.data(), k, count, g.data());  // The Gram matrix C^T C.
  std::vector<double> gram(uint64_t{k} * k), v;
  for (uint32_t a = 0; a < k; ++a)
    for (uint32_t b = 0; b < k; ++b) gram[a * k + b] = 0.5 * (double(g[a * k + b]) + g[b * k + a]);
  // Until the off-diagonal holds 1e-8 of the squares: eigenvectors within about 1e-4, beyond
  // what int8 basis codes keep.
  Jacobi(int(k), &gram, &v, 1e-8);
  const auto eigenvalue = [&](uint32_t i) { return gram[i * k + i]; };
  uint32_t order[kMaxRank];
  for (uint32_t i = 0; i < k; ++i) order[i] = i;
  std::stable_sort(order, order + k,
                   [&](uint32_t a, uint32_t b) { return eigenvalue(a) > eigenvalue(b); });
  std::vector<float> rot(uint64_t{k} * k);  // rot[i][j]: q_i's weight in direction j
  for (uint32_t i = 0; i < k; ++i)
    for (uint32_t j = 0; j < k; ++j) rot[i * k + j] = float(v[i * k + order[j]]);
  dirs->assign(uint64_t{k} * D, 0.f);
  rk.accumulate(q.data(), D, k, rot.data(), k, D, dirs->data());
  for (uint32_t j = 0; j < k; ++j) variances->push_back(eigenvalue(order[j]) / count);
  proj->assign(uint64_t{count} * k, 0.f);
  for (uint32_t n = 0; n < count; ++n) {
    float* __restrict p = proj->data() + uint64_t{n} * k;
    for (uint32_t i = 0; i < k; ++i) {
      const float ci = c[n * k + i];
      const float* __restrict ri = &rot[i * k];
      for (uint32_t j = 0; j < k; ++j) p[j] += ci * ri[j];
    }
  }
}

// The directions of head h kept: rank by threshold and by the bits each saves (its variance
// against the noise floor left by all the directions found).
uint32_t ChooseRank(const SegmentShape& shape, const std::vector<double>& variances, double trace) {
  const uint32_t T = shape.tokens, D = shape.head_dim;
  uint32_t r = uint32_t(variances.size());
  double rest = trace;
  for (double v : variances) rest -= v;
  // A direction saves about T * D / 2 * log2(1 + var / (D * floor)) bits of residual.
  const double floor = std::max(rest, 0.0) / std::max<double>(1, D - variances.size());
  const double need =
      D * floor * (std::exp2(2.0 * (kBasisBits * D + kCoefBits * T) / (double(T) * D)) - 1);
  while (r > 0 && !(variances[r - 1] > need && variances[r - 1] > kRankThreshold * trace / D)) --r;
  return r;
}

// int8 codes over the directions' range (the first r of `dirs`), the decoded basis and its
// squared norms; var[d] less each direction's share. Returns the basis scale (0: no basis).
float QuantizeBasis(const std::vector<float>& dirs, const std::vector<double>& variances,
                    uint32_t r, uint32_t D, HeadPlan* hp, std::vector<double>* norm2,
                    std::vector<double>* var) {
  float top[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // The largest |direction entry|, in 8 lanes.
  uint32_t i = 0;
  for (; i + 8 <= r * D; i += 8)
    for (uint32_t l = 0; l < 8; ++l) top[l] = std::max(top[l], std::fabs(dirs[i + l]));
  for (; i < r * D; ++i) top[0] = std::max(top[0], std::fabs(dirs[i]));
  float bmax = 0;
  for (float t : top) bmax = std::max(bmax, t);
  const float bs = bmax / 127.f, inv = 127.f / bmax;
  if (r == 0 || !(bs > 0) || !std::isfinite(bs) || !std::isfinite(inv)) r = 0;
  hp->codes.resize(uint64_t{r} * D);
  hp->basis.resize(uint64_t{r} * D);
  norm2->assign(r, 0);
  for (uint32_t j = 0; j < r; ++j) {
    const float* __restrict dir = &dirs[j * D];
    int8_t* __restrict codes = &hp->codes[j * D];
    float* __restrict basis = &hp->basis[j * D];
    float n2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint32_t d = 0; d < D; ++d) {
      const float c = std::min(127.f, std::max(-127.f, RoundNearest(dir[d] * inv)));
      codes[d] = int8_t(c);
      basis[d] = c * bs;
      n2[d % 8] += basis[d] * basis[d];
    }
    (*norm2)[j] = ((n2[0] + n2[1]) + (n2[2] + n2[3])) + ((n2[4] + n2[5]) + (n2[6] + n2[7]));
    const double vj = variances[j];
    for (uint32_t d = 0; d < D; ++d) (*var)[d] -= vj * (double(dir[d]) * dir[d]);
  }
  return r ? bs : 0.f;
}

// Outlier channels of a head with residual variance `var`: above kOutlierRatio times the
// median, the largest kMaxOutliers at most, in channel order; returns their extra planes.
uint32_t ChooseOutliers(const std::vector<double>& var, HeadPlan* hp) {
  const uint32_t D = uint32_t(var.size());
  hp->is_outlier.assign(D, 0);
  hp->outlier.clear();
  if (D < 8) return 0;
  thread_local std::vector<double> sorted;
  sorted.assign(var.begin(), var.end());
  std::nth_element(sorted.begin(), sorted.begin() + D / 2, sorted.end());
  const double median = sorted[D / 2];
  if (!(median > 0)) return 0;
  std::vector<uint32_t>& over = hp->outlier;
  for (uint32_t d = 0; d < D; ++d) {
    if (var[d] > kOutlierRatio * median) over.push_back(d);
  }
  if (over.empty()) return 0;
  std::stable_sort(over.begin(), over.end(),
                   [&](uint32_t a, uint32_t b) { return var[a] > var[b]; });
  if (over.size() > kMaxOutliers) over.resize(kMaxOutliers);
  const uint32_t extra = uint32_t(std::ceil(0.5 * std::log2(var[over[0]] / median)));
  std::sort(over.begin(), over.end());
  for (uint32_t d : over) hp->is_outlier[d] = 1;
  return std::min(kMaxPlanes - 1, std::max(1u, extra));
}

// The head's model rows (HeadPlan::model) and, for keys, per_z: a row's residual is its squared
// distance less its projections on the r directions kept; its regular part the head's regular
// share of the residual variance `var` (`regular` of its sum).
void ModelRows(const Sample& sp, uint32_t h, uint32_t r, const std::vector<float>& proj,
               double regular, const std::vector<double>& var, const SampleClasses& classes,
               HeadPlan* hp) {
  const uint32_t count = sp.count, D = uint32_t(var.size());
  const uint32_t H = uint32_t(sp.var.size() / D);
  const uint32_t k = count ? uint32_t(proj.size() / count) : 0;
  const float* dist = &sp.dist[uint64_t{h} * count];
  double total = 0, residual_var = 0;
  for (uint32_t n = 0; n < count; ++n) total += dist[n];
  for (double v : var) residual_var += v;
  hp->per_z = classes.keys && total > 0 && std::isfinite(total)
                  ? 2 * kTokenWeighting / std::log(2.0) * count / total
                  : 0;
  const double share = residual_var > 0 ? regular / residual_var : 1;
  const uint32_t nreg = D - uint32_t(hp->outlier.size());
  hp->model.resize(count);
  for (uint32_t n = 0; n < count; ++n) {
    double res = dist[n];
    for (uint32_t j = 0; j < r; ++j) res -= double(proj[n * k + j]) * proj[n * k + j];
    res = std::max(res, 0.0);
    const uint8_t cls = classes.keys ? ClassOf(double(dist[n]), hp->per_z)
                        : classes.classes == nullptr || classes.classes->empty()
                            ? 0
                            : (*classes.classes)[uint64_t{n} * sp.stride * H + h];
    const double reg = res * share;
    hp->model[n] = {nreg ? GetTables().weight[cls] * reg / nreg : 0.0, reg, res - reg};
  }
}

}  // namespace

void FastLayouts(uint32_t r, uint32_t D, HeadPlan* hp) {
  hp->chunks.assign(D % 16 == 0 ? uint64_t{D} * 8 : 0, 0.f);
  hp->pairs.assign(D % 16 == 0 ? uint64_t{D} * 8 : 0, 0);
  if (D % 16 == 0) {
    for (uint32_t j = 0; j < r; ++j)
      for (uint32_t d = 0; d < D; d += 16) {  // Direction j of channels d .. d + 15.
        std::memcpy(&hp->chunks[(uint64_t{d / 16} * 8 + j) * 16], &hp->basis[j * D + d],
                    16 * sizeof(float));
      }
    FillPairs(hp->codes.data(), r, D, hp->pairs.data());
  }
  hp->masks.assign((D + 31) / 32, 0);
  for (uint32_t d : hp->outlier) hp->masks[d / 32] |= 1u << (d % 32);
}

bool LoadSample(const SegmentShape& shape, const RowKernels& rk, const FastKernels& fast,
                const uint16_t* in, uint32_t stride, uint32_t count, Sample* sp) {
  const uint32_t H = shape.kv_heads, D = shape.head_dim;
  const uint64_t HD = uint64_t{H} * D;
  sp->count = count;
  sp->stride = stride;
  sp->raw.resize(count * HD);
  std::vector<float> sums(HD, 0.f);
  double energy = 0;
  for (uint32_t n = 0; n < count; ++n) {
    if (n + 1 < count) {  // The next sampled token, stride tokens on: the hardware misses it.
      const char* next = reinterpret_cast<const char*>(in + uint64_t{n + 1} * stride * HD);
      for (uint64_t b = 0; b < 2 * HD; b += 64) __builtin_prefetch(next + b);
    }
    energy +=
        rk.load(shape.dtype, in + uint64_t{n} * stride * HD, HD, &sp->raw[n * HD], sums.data());
  }
  sp->energy = energy * shape.tokens / count;
  if (!std::isfinite(sp->energy)) return false;
  sp->stored.resize(HD);
  sp->means.resize(HD);
  fast.means(shape.dtype, sums.data(), count, HD, sp->stored.data(), sp->means.data());
  sp->xs.resize(count * HD);
  sp->var.assign(HD, 0.f);
  sp->dist.resize(uint64_t{H} * count);
  for (uint32_t h = 0; h < H; ++h) {
    float* var = &sp->var[uint64_t{h} * D];
    for (uint32_t n = 0; n < count; ++n) {
      sp->dist[uint64_t{h} * count + n] =
          rk.centre(&sp->raw[n * HD + uint64_t{h} * D], &sp->means[uint64_t{h} * D], D,
                    &sp->xs[(uint64_t{h} * count + n) * D], var);
    }
    for (uint32_t d = 0; d < D; ++d) var[d] /= float(count);
  }
  return true;
}

void PlanHead(const SegmentShape& shape, const RowKernels& rk, const Sample& sp, uint32_t h,
              double d_avg, const SampleClasses& classes, HeadPlan* hp) {
  const uint32_t T = shape.tokens, D = shape.head_dim, count = sp.count;
  const float* xs = &sp.xs[uint64_t{h} * count * D];
  std::vector<double> var(sp.var.begin() + uint64_t{h} * D, sp.var.begin() + uint64_t{h + 1} * D);
  double trace = 0;
  for (double v : var) trace += v;
  const uint32_t kmax = (T >= 2 * kPack && D >= 4) ? std::min(kMaxRank, D / 2) : 0;
  std::vector<float> dirs, proj;
  std::vector<double> variances, norm2;
  uint32_t r = 0;
  if (kmax > 0 && trace > 0) {
    SampleBasis(rk, xs, count, D, kmax, &dirs, &variances, &proj);
    r = ChooseRank(shape, variances, trace);
  }
  const float bs = QuantizeBasis(dirs, variances, r, D, hp, &norm2, &var);
  if (bs == 0) r = 0;
  for (double& v : var) v = std::max(v, 0.0);
  const uint32_t extra = ChooseOutliers(var, hp);
  double regular = 0;
  for (uint32_t d = 0; d < D; ++d) regular += hp->is_outlier[d] ? 0 : var[d];
  const uint32_t nreg = D - uint32_t(hp->outlier.size());
  const double spread = nreg ? std::sqrt(regular / nreg) : 0;
  hp->unit = float(std::min<double>(kMaxHeadScale, std::max(0x1p-60, spread > 0 ? spread : 1)));
  hp->unit2 = double(hp->unit) * hp->unit;
  double step = kCoefStep * std::min(spread, std::sqrt(12 * d_avg));
  // Never so fine that a coefficient 6 deviations out overflows its code.
  step = std::max(step, 6 * std::sqrt(r ? variances[0] : 0.0) / kMaxCoefCode);
  if (!(step > 0) || !std::isfinite(step)) r = 0;
  hp->inv_step.resize(r);
  for (uint32_t j = 0; j < r; ++j) hp->inv_step[j] = float(1.0 / (step * norm2[j]));
  hp->codes.resize(uint64_t{r} * D);
  hp->basis.resize(uint64_t{r} * D);
  FastLayouts(r, D, hp);
  ModelRows(sp, h, r, proj, regular, var, classes, hp);
  RowHead& v = hp->view;
  v.D = D;
  v.rank = r;
  v.outliers = uint32_t(hp->outlier.size());
  v.extra = v.outliers ? extra : 0;
  v.lr_scale = r ? float(step * bs) : 0.f;
  v.means = &sp.means[uint64_t{h} * D];
  v.basis = hp->basis.data();
  v.inv_step = hp->inv_step.data();
  v.codes = hp->codes.data();
  v.chunks = hp->chunks.data();
  v.pairs = hp->pairs.data();
  v.is_outlier = hp->is_outlier.data();
  v.outlier = hp->outlier.data();
  v.outlier_masks = hp->masks.data();
}

StepModel::StepModel(const std::vector<HeadPlan>& heads, double scale)
    : heads_(heads), scale_(scale), count_(heads.empty() ? 0 : uint32_t(heads[0].model.size())) {
  // Per head, the rows sorted by a and prefix sums of their energies: at a given mu the rows
  // with b planes form a run, found by binary search.
  const uint32_t H = uint32_t(heads.size()), count = count_;
  a_.resize(uint64_t{H} * count);
  regular_.resize(uint64_t{H} * (count + 1));
  outlier_.resize(uint64_t{H} * (count + 1));
  std::vector<ModelRow> sorted;
  for (uint32_t h = 0; h < H; ++h) {
    sorted = heads[h].model;
    std::sort(sorted.begin(), sorted.end(),
              [](const ModelRow& x, const ModelRow& y) { return x.a < y.a; });
    double* pr = &regular_[uint64_t{h} * (count + 1)];
    double* po = &outlier_[uint64_t{h} * (count + 1)];
    pr[0] = po[0] = 0;
    for (uint32_t n = 0; n < count; ++n) {
      a_[uint64_t{h} * count + n] = sorted[n].a;
      pr[n + 1] = pr[n] + sorted[n].regular;
      po[n + 1] = po[n] + sorted[n].outlier;
    }
  }
}

double StepModel::Predicted(double mu) const {
  const Tables& tb = GetTables();
  const uint32_t count = count_;
  const double inv = 1 / mu;
  double e = 0;
  for (uint32_t h = 0; h < heads_.size(); ++h) {
    const double* ah = &a_[uint64_t{h} * count];
    const double* pr = &regular_[uint64_t{h} * (count + 1)];
    const double* po = &outlier_[uint64_t{h} * (count + 1)];
    const uint32_t extra = heads_[h].view.extra, cap = kMaxPlanes - extra;
    uint32_t from = 0;
    for (uint32_t b = 0; b <= cap && from < count; ++b) {  // Rows [from, to) take b planes.
      const uint32_t to =
          b == cap ? count
                   : uint32_t(std::lower_bound(ah + from, ah + count, tb.bit[b] * inv) - ah);
      if (to > from) {
        e += (pr[to] - pr[from]) * kDistortion[b] +
             (po[to] - po[from]) * kDistortion[std::min(kMaxPlanes, b + extra)];
        from = to;
      }
    }
  }
  return e * scale_;
}

double StepModel::Solve(double aim) const {
  double lo = -64, hi = 64;  // log2 mu
  while (hi - lo > 1.0 / 32) {
    const double mid = (lo + hi) / 2;
    (Predicted(std::exp2(mid)) > aim ? lo : hi) = mid;
  }
  return std::exp2(hi);
}

void MakeRowRule(const HeadPlan& hp, double mu, RowRule* rule) {
  const Tables& tb = GetTables();
  const RowHead& v = hp.view;
  const uint32_t nreg = v.D - v.outliers;
  const double g = double(HalfStep(v.extra)) / HalfStep(0);
  rule->cap = kMaxPlanes - v.extra;
  for (uint32_t p = 0; p < kMaxPlanes; ++p) {
    for (uint32_t k = 0; k < kClasses; ++k) {
      rule->planes[k][p] = nreg ? float(tb.bit[p] * nreg / (mu * tb.weight[k])) : INFINITY;
    }
    rule->scale[p] = float(tb.scale[p] * hp.unit2 * nreg);
    rule->outlier_scale[p] =
        v.outliers ? float(tb.scale[p] * hp.unit2 * v.outliers / (g * g)) : INFINITY;
  }
  const float never = std::numeric_limits<float>::quiet_NaN();  // ChooseMeta's fourth lane.
  for (uint32_t k = 0; k < kClasses; ++k) rule->planes[k][kMaxPlanes] = never;
  rule->scale[kMaxPlanes] = rule->outlier_scale[kMaxPlanes] = never;
}

}  // namespace kvpool::kernels::kvpool::internal
