// RMSNorm: one block of 128 threads per row; each thread sums the squares of a strided slice,
// then warp shuffles and one shared-memory pass finish the row's sum.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "rms_norm.h"

#include "../float_io.cuh"
#include "../launch.cuh"

namespace pearlmoe::norm {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

using io::load;
__device__ __forceinline__ float round_to(float v, const float*) { return v; }
__device__ __forceinline__ float round_to(float v, const __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16(v));
}
__device__ __forceinline__ float round_to(float v, const __half*) {
  return __half2float(__float2half(v));
}
using io::store;

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                T* __restrict__ out, int64_t hidden, int64_t x_row_stride,
                                float eps) {
  __shared__ float partial[kWarps];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_row_stride;
  T* dst = out + row * hidden;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
    const float v = load(xr + i);
    sum_sq += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = sum_sq;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += partial[w];
  const float inv_rms = rsqrtf(total / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
    const float normed = round_to(load(xr + i) * inv_rms, xr);
    store(dst + i, load(weight + i) * normed);
  }
}

}  // namespace

cudaError_t rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffff || p.hidden <= 0) return cudaErrorInvalidValue;
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return launch_kernel(&rms_norm_kernel<T>, static_cast<unsigned>(p.rows), kThreads, 0, stream,
                         static_cast<const T*>(p.x), static_cast<const T*>(p.weight),
                         static_cast<T*>(p.out), p.hidden, p.x_row_stride, p.eps);
  };
  switch (p.dtype) {
    case DType::kF32:
      return launch(static_cast<float*>(nullptr));
    case DType::kBF16:
      return launch(static_cast<__nv_bfloat16*>(nullptr));
    case DType::kF16:
      return launch(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace pearlmoe::norm
