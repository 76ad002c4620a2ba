#include "client/synthetic.h"

#include <cstring>
#include <random>

#include "common/half.h"

namespace kvpool::client {

std::string SyntheticKv(const SyntheticOptions& o) {
  const uint64_t per_token = uint64_t{o.num_kv_heads} * o.head_dim;
  std::string out(uint64_t{o.num_layers} * 2 * o.tokens * per_token * 2, '\0');
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto store = [&](uint64_t index, float v) {
    const uint16_t h = o.dtype == DType::kBf16 ? FloatToBf16(v) : FloatToFp16(v);
    std::memcpy(out.data() + 2 * index, &h, 2);
  };
  std::vector<float> basis(uint64_t{o.rank} * o.head_dim);
  std::vector<float> channel_scale(o.head_dim);
  for (uint32_t l = 0; l < o.num_layers; ++l) {
    for (uint32_t h = 0; h < o.num_kv_heads; ++h) {
      for (float& b : basis) b = normal(rng);
      for (uint32_t d = 0; d < o.head_dim; ++d) channel_scale[d] = 1.f;
      for (uint32_t k = 0; k < o.outlier_channels && k < o.head_dim; ++k) {
        channel_scale[rng() % o.head_dim] = 8.f + 4.f * std::abs(normal(rng));
      }
      for (uint64_t t = 0; t < o.tokens; ++t) {
        float mix[64];
        const uint32_t rank = o.rank < 64 ? o.rank : 64;
        for (uint32_t r = 0; r < rank; ++r) mix[r] = normal(rng);
        for (uint32_t d = 0; d < o.head_dim; ++d) {
          float k = 0.3f * normal(rng);
          for (uint32_t r = 0; r < rank; ++r) k += mix[r] * basis[r * o.head_dim + d] * 0.5f;
          const uint64_t key_index = ((uint64_t{l} * 2 + 0) * o.tokens + t) * per_token +
                                     uint64_t{h} * o.head_dim + d;
          store(key_index, k * channel_scale[d]);
          const uint64_t value_index = key_index + o.tokens * per_token;
          store(value_index, normal(rng));
        }
      }
    }
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
