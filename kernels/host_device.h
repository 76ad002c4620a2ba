// KVPOOL_HD: marks an inline function that both the host and CUDA device code call (the
// format helpers the CPU paths and the kernels share, so that both compute the same bits).
#ifndef KVPOOL_KERNELS_HOST_DEVICE_H_
#define KVPOOL_KERNELS_HOST_DEVICE_H_

#if defined(__CUDACC__)
#define KVPOOL_HD __host__ __device__ inline
#else
#define KVPOOL_HD inline
#endif

#endif  // KVPOOL_KERNELS_HOST_DEVICE_H_
