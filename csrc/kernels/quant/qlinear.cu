// GGUF-quantised projections on CUDA. qlinear: blocks of 4 warps, a warp per output column and
// up to kRows x rows per block (blockIdx.y picks them); lane l expands blocks l, l + 32, ... of
// its column into registers and multiplies them into one fp32 sum per row, then a butterfly of
// shuffles adds the lanes. dequantize: a thread per block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "qlinear.h"

#include "../float_io.cuh"
#include "../launch.cuh"

namespace pearlmoe::quant {
namespace {

constexpr int kWarps = 4;
constexpr int kRows = 8;

using io::load;
using io::store;

template <typename T>
__global__ void qlinear_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                               T* __restrict__ out, int64_t rows, int64_t n, int64_t k,
                               int64_t x_row_stride, int64_t w_row_bytes, Format format) {
  const int lane = threadIdx.x % 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (col >= n) return;  // a whole warp leaves together
  const int count = rows - r0 < kRows ? static_cast<int>(rows - r0) : kRows;
  const int64_t blocks = k / kBlockValues;
  const int bytes = block_bytes(format);
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  for (int64_t b = lane; b < blocks; b += 32) {
    float v[kBlockValues];
    dequantize_block(format, w + col * w_row_bytes + b * bytes, v);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < count) {
        const T* xr = x + (r0 + r) * x_row_stride + b * kBlockValues;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < kBlockValues; ++i) s += v[i] * load(xr + i);
        acc[r] += s;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float s = acc[r];
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (lane == 0 && r < count) store(out + (r0 + r) * n + col, s);
  }
}

template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ w, T* __restrict__ out, int64_t n,
                                  int64_t k, int64_t w_row_bytes, Format format) {
  const int64_t blocks = k / kBlockValues;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * blocks) return;
  const int64_t row = i / blocks, b = i % blocks;
  float v[kBlockValues];
  dequantize_block(format, w + row * w_row_bytes + b * block_bytes(format), v);
  T* dst = out + row * k + b * kBlockValues;
#pragma unroll
  for (int j = 0; j < kBlockValues; ++j) store(dst + j, v[j]);
}

template <typename F>
cudaError_t by_dtype(DType dtype, const F& launch) {
  switch (dtype) {
    case DType::kF32:
      return launch(static_cast<float*>(nullptr));
    case DType::kBF16:
      return launch(static_cast<__nv_bfloat16*>(nullptr));
    case DType::kF16:
      return launch(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t qlinear_cuda(const QLinearParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  if (p.k % kBlockValues != 0 || p.rows < 0 || p.n < 0) return cudaErrorInvalidValue;
  const int64_t grid_x = (p.n + kWarps - 1) / kWarps, grid_y = (p.rows + kRows - 1) / kRows;
  if (grid_x > 0x7fffffff || grid_y > 65535) return cudaErrorInvalidValue;
  return by_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
    return launch_kernel(&qlinear_kernel<T>, grid, kWarps * 32, 0, stream,
                         static_cast<const T*>(p.x), p.w, static_cast<T*>(p.out), p.rows, p.n, p.k,
                         p.x_row_stride, p.w_row_bytes, p.format);
  });
}

cudaError_t dequantize_cuda(const DequantizeParams& p, cudaStream_t stream) {
  const int64_t blocks = p.n * (p.k / kBlockValues);
  if (blocks == 0) return cudaSuccess;
  if (p.k % kBlockValues != 0 || blocks < 0) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;
  const int64_t grid = (blocks + kThreads - 1) / kThreads;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  return by_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return launch_kernel(&dequantize_kernel<T>, static_cast<unsigned>(grid), kThreads, 0, stream,
                         p.w, static_cast<T*>(p.out), p.n, p.k, p.w_row_bytes, p.format);
  });
}

}  // namespace pearlmoe::quant
