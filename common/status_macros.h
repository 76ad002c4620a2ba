// Status propagation macros. Debian's abseil (20220623) ships none, so the project keeps its own.
// Thread-safe (stateless).
#ifndef KVPOOL_COMMON_STATUS_MACROS_H_
#define KVPOOL_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVPOOL_STATUS_CONCAT_INNER_(a, b) a##b
#define KVPOOL_STATUS_CONCAT_(a, b) KVPOOL_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define KVPOOL_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status kvpool_status_ = (expr);          \
    if (!kvpool_status_.ok()) return kvpool_status_; \
  } while (0)

// `lhs` = value of `expr` (an absl::StatusOr<T>), or returns its status from the enclosing
// function. `lhs` may be a declaration: KVPOOL_ASSIGN_OR_RETURN(auto x, MakeX());
#define KVPOOL_ASSIGN_OR_RETURN(lhs, expr) \
  KVPOOL_ASSIGN_OR_RETURN_IMPL_(KVPOOL_STATUS_CONCAT_(kvpool_statusor_, __LINE__), lhs, expr)
#define KVPOOL_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()

#endif  // KVPOOL_COMMON_STATUS_MACROS_H_
