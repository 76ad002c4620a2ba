// CUDA errors as absl::Status, at the edge (.cu files only). Thread-safe.
#ifndef KVPOOL_KERNELS_CUDA_STATUS_H_
#define KVPOOL_KERNELS_CUDA_STATUS_H_

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kvpool::kernels {

// cudaSuccess -> OK; out of memory -> ResourceExhausted; no device -> Unavailable;
// invalid value -> InvalidArgument; else Internal. The message names `what` and the error.
inline absl::Status FromCuda(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  const std::string message = absl::StrCat(what, ": ", cudaGetErrorString(err));
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return absl::UnavailableError(message);
    case cudaErrorInvalidValue:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace kvpool::kernels

#define KVPOOL_RETURN_IF_CUDA_ERROR(expr)                                       \
  do {                                                                          \
    const cudaError_t kvpool_cuda_err_ = (expr);                                \
    if (kvpool_cuda_err_ != cudaSuccess) return ::kvpool::kernels::FromCuda(kvpool_cuda_err_, #expr); \
  } while (0)

#endif  // KVPOOL_KERNELS_CUDA_STATUS_H_
