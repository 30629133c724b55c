// Torch-free RMSNorm with Hugging Face's rounding points: for each row x [H],
//     normed = (x_fp32 * rsqrt(mean(x_fp32²) + eps)) rounded to the dtype,
//     out    = (weight · normed) rounded to the dtype.
// Each row is reduced on its own, in an order that does not depend on how many rows a call has,
// so a token's output is the same in a decode step and in a verification window.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pearlmoe::norm {

enum class DType { kF32, kBF16, kF16 };

struct RmsNormParams {
  const void* x;       // [rows, H], row stride below, unit last stride
  const void* weight;  // [H], x's dtype
  void* out;           // [rows, H] contiguous
  int64_t rows, hidden, x_row_stride;
  float eps;
  DType dtype;
};

cudaError_t rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream);

}  // namespace pearlmoe::norm
