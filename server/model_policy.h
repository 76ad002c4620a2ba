// PerModel<T>: a setting chosen per model id, with a default for models not listed (the
// codec and the fusion options of a model's puts). Thread-compatible.
#ifndef KVPOOL_SERVER_MODEL_POLICY_H_
#define KVPOOL_SERVER_MODEL_POLICY_H_

#include <string>

#include "absl/container/flat_hash_map.h"

namespace kvpool::server {

template <typename T>
struct PerModel {
  T default_value{};
  absl::flat_hash_map<std::string, T> per_model;  // By model id.

  const T& For(const std::string& model_id) const {
    auto it = per_model.find(model_id);
    return it == per_model.end() ? default_value : it->second;
  }
};

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_MODEL_POLICY_H_
