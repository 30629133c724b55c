// Shared macros for the torch-free kernels. Everything under csrc/kernels/ takes raw pointers,
// sizes and a cudaStream_t, and returns cudaError_t, so the C++ benchmarks can use it without
// libtorch.
#pragma once

#if defined(__CUDACC__)
#define PM_HD __host__ __device__ __forceinline__
#else
#define PM_HD inline
#endif

// Evaluate a CUDA runtime call and return its error from the enclosing function on failure.
#define PM_CUDA_TRY(expr)         \
  do {                            \
    cudaError_t pm_err_ = (expr); \
    if (pm_err_ != cudaSuccess) { \
      return pm_err_;             \
    }                             \
  } while (0)
