#include "client/synthetic.h"

#include <cstring>
#include <algorithm>
#include <cmath>
#include <random>

#include "common/half.h"

namespace kvpool::client {

namespace {

// One head's keys or values for all tokens: out[t * stride + d], d < head_dim.
void LowRankRows(std::mt19937_64& rng, uint64_t tokens, uint32_t head_dim, uint32_t rank,
                 float noise, const float* scale, const float* offset, float* out,
                 uint64_t stride) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> basis(uint64_t{rank} * head_dim);
  for (float& b : basis) b = normal(rng);
  const float signal = rank > 0 ? std::sqrt((1.f - noise * noise) / rank) : 0.f;
  const float noise_amp = rank > 0 ? noise : 1.f;
  std::vector<float> mix(rank);
  for (uint64_t t = 0; t < tokens; ++t) {
    for (float& m : mix) m = normal(rng);
    for (uint32_t d = 0; d < head_dim; ++d) {
      float x = noise_amp * normal(rng);
      for (uint32_t r = 0; r < rank; ++r) x += signal * mix[r] * basis[uint64_t{r} * head_dim + d];
      out[t * stride + d] = offset[d] + scale[d] * x;
    }
  }
}

}  // namespace

std::string SyntheticKv(const SyntheticOptions& o) {
  const uint64_t per_token = uint64_t{o.num_kv_heads} * o.head_dim;
  const uint64_t per_kind = o.tokens * per_token;
  std::string out(uint64_t{o.num_layers} * 2 * per_kind * 2, '\0');
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const float noise = std::min(1.f, std::max(0.f, o.noise));
  std::vector<float> values(per_kind);
  std::vector<float> key_scale(o.head_dim), key_offset(o.head_dim);
  const std::vector<float> ones(o.head_dim, 1.f), zeros(o.head_dim, 0.f);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data());
  auto store = [&](uint64_t base) {
    for (uint64_t i = 0; i < per_kind; ++i) {
      dst[base + i] = FloatToElement(o.dtype, values[i]);
    }
  };
  for (uint32_t l = 0; l < o.num_layers; ++l) {
    for (uint32_t h = 0; h < o.num_kv_heads; ++h) {
      std::fill(key_scale.begin(), key_scale.end(), 1.f);
      std::fill(key_offset.begin(), key_offset.end(), 0.f);
      for (uint32_t k = 0; k < o.outlier_channels && k < o.head_dim; ++k) {
        const uint32_t c = rng() % o.head_dim;
        key_scale[c] = 8.f + 4.f * std::uniform_real_distribution<float>(0.f, 1.f)(rng);
        key_offset[c] = (rng() & 1 ? 0.5f : -0.5f) * key_scale[c];
      }
      LowRankRows(rng, o.tokens, o.head_dim, o.key_rank, noise, key_scale.data(),
                  key_offset.data(), values.data() + uint64_t{h} * o.head_dim, per_token);
    }
    store(uint64_t{l} * 2 * per_kind);
    for (uint32_t h = 0; h < o.num_kv_heads; ++h) {
      LowRankRows(rng, o.tokens, o.head_dim, o.value_rank, noise, ones.data(), zeros.data(),
                  values.data() + uint64_t{h} * o.head_dim, per_token);
    }
    store(uint64_t{l} * 2 * per_kind + per_kind);
  }
  return out;
}

SyntheticOptions SyntheticShape(const KvSpec& spec) {
  SyntheticOptions o;
  o.num_layers = spec.num_layers;
  o.num_kv_heads = spec.num_kv_heads;
  o.head_dim = spec.head_dim;
  o.tokens = spec.tokens_per_block;
  o.dtype = spec.dtype;
  return o;
}

std::vector<std::string> SyntheticCorpus(const CorpusOptions& o) {
  const uint32_t families = std::max<uint32_t>(1, std::min(o.families, std::max(o.blocks, 1u)));
  auto as_float = [&o](const std::string& bytes) {
    return ElementsToFloats(o.shape.dtype,
                            {reinterpret_cast<const uint16_t*>(bytes.data()), bytes.size() / 2});
  };
  std::vector<std::vector<float>> bases;
  for (uint32_t f = 0; f < families; ++f) {
    SyntheticOptions so = o.shape;
    so.seed = o.seed * 1000003 + f;
    bases.push_back(as_float(SyntheticKv(so)));
  }
  const uint64_t per_segment = o.shape.tokens * o.shape.num_kv_heads * o.shape.head_dim;
  std::mt19937_64 rng(o.seed ^ 0x5eed5eed5eedull);
  std::uniform_real_distribution<float> log_scale(std::log(0.5f), std::log(2.f));
  std::vector<std::string> out;
  for (uint32_t b = 0; b < o.blocks; ++b) {
    const std::vector<float>& base = bases[uint64_t{b} * families / o.blocks];
    std::vector<float> own;  // Unrelated corpora (one block per family) use the base alone.
    if (o.variation != 0 && families < o.blocks) {
      SyntheticOptions so = o.shape;
      so.seed = (o.seed + 7) * 2000003 + b;
      own = as_float(SyntheticKv(so));
    }
    std::string block(base.size() * 2, '\0');
    uint16_t* dst = reinterpret_cast<uint16_t*>(block.data());
    for (uint64_t s = 0; s * per_segment < base.size(); ++s) {
      const float a = std::exp(log_scale(rng));
      for (uint64_t i = s * per_segment; i < (s + 1) * per_segment && i < base.size(); ++i) {
        const float v = a * (base[i] + (own.empty() ? 0.f : o.variation * own[i]));
        dst[i] = FloatToElement(o.shape.dtype, v);
      }
    }
    out.push_back(std::move(block));
  }
  return out;
}

std::vector<uint32_t> SyntheticTokenIds(uint64_t count, uint32_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  std::vector<uint32_t> ids(count);
  for (uint32_t& id : ids) id = static_cast<uint32_t>(rng() % (vocab ? vocab : 1));
  return ids;
}

}  // namespace kvpool::client
