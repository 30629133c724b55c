// Elementwise kernels of the MoE layer: SwiGLU activation, weighted combine, tail zeroing.
// Memory-bound; each thread handles one element per grid-stride step (coalesced along the row).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../launch.cuh"
#include "moe_elementwise.h"

namespace pearlmoe::moe_gemm {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half(v);
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

template <typename T>
__global__ void silu_and_mul_kernel(const T* __restrict__ h, T* __restrict__ out, int64_t rows,
                                    int64_t inter, const int32_t* __restrict__ routed_rows) {
  if (routed_rows != nullptr) rows = min(rows, int64_t{*routed_rows});
  const int64_t n = rows * inter;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < n;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t r = idx / inter, i = idx % inter;
    const float gate = to_float(h[r * 2 * inter + i]);
    const float up = to_float(h[r * 2 * inter + inter + i]);
    out[idx] = from_float<T>(gate / (1.f + expf(-gate)) * up);
  }
}

template <typename T>
__global__ void combine_kernel(const T* __restrict__ expert_out, const float* __restrict__ weights,
                               const int32_t* __restrict__ slot_to_row,
                               const int32_t* __restrict__ routed_rows,
                               const T* __restrict__ shared, T* __restrict__ y, int64_t tokens,
                               int top_k, int64_t hidden) {
  const int64_t n = tokens * hidden;
  const int32_t routed = *routed_rows;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < n;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t t = idx / hidden, c = idx % hidden;
    float acc = shared != nullptr ? to_float(shared[idx]) : 0.f;
    for (int i = 0; i < top_k; ++i) {
      const int32_t row = slot_to_row[t * top_k + i];
      if (row < routed) acc += weights[t * top_k + i] * to_float(expert_out[row * hidden + c]);
    }
    y[idx] = from_float<T>(acc);
  }
}

template <typename T>
__global__ void zero_tail_kernel(T* __restrict__ c, int64_t m, int64_t cols,
                                 const int32_t* __restrict__ routed_rows) {
  const int64_t first = min(max(int64_t{*routed_rows}, int64_t{0}), m);  // offsets may be unchecked
  const int64_t n = (m - first) * cols;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < n;
       idx += int64_t{gridDim.x} * kThreads) {
    c[first * cols + idx] = from_float<T>(0.f);
  }
}

template <typename Fn>
cudaError_t dispatch(DType dtype, Fn&& fn) {
  if (dtype == DType::kBF16) return fn(__nv_bfloat16{});
  if (dtype == DType::kFP16) return fn(__half{});
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t silu_and_mul(const void* h, void* out, int64_t rows, int64_t inter,
                         const int32_t* routed_rows, DType dtype, cudaStream_t stream) {
  if (rows * inter == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(&silu_and_mul_kernel<T>, grid_for(rows * inter), kThreads, 0, stream,
                         static_cast<const T*>(h), static_cast<T*>(out), rows, inter, routed_rows);
  });
}

cudaError_t moe_combine(const void* expert_out, const float* weights, const int32_t* slot_to_row,
                        const int32_t* group_offsets, int num_groups, const void* shared, void* y,
                        int64_t tokens, int top_k, int64_t hidden, DType dtype,
                        cudaStream_t stream) {
  if (tokens * hidden == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(&combine_kernel<T>, grid_for(tokens * hidden), kThreads, 0, stream,
                         static_cast<const T*>(expert_out), weights, slot_to_row,
                         group_offsets + num_groups, static_cast<const T*>(shared),
                         static_cast<T*>(y), tokens, top_k, hidden);
  });
}

cudaError_t zero_tail_rows(void* c, int64_t m, int64_t cols, const int32_t* group_offsets,
                           int num_groups, DType dtype, cudaStream_t stream) {
  if (m * cols == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    // Sized for the worst case (nothing routed); threads past the real tail exit at once.
    return launch_kernel(&zero_tail_kernel<T>, grid_for(m * cols), kThreads, 0, stream,
                         static_cast<T*>(c), m, cols, group_offsets + num_groups);
  });
}

}  // namespace pearlmoe::moe_gemm
