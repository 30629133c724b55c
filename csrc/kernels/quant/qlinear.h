// Torch-free CUDA kernels for GGUF-quantised weights (gguf_blocks.h):
//   qlinear_cuda     out [rows, N] = x [rows, K] · dequant(w)^T for a few rows (decode): one warp
//                    per output column, each lane expanding whole blocks in registers;
//   dequantize_cuda  w expanded to [N, K] in x's dtype (a prefill then multiplies on cuBLAS).
// Each output is summed in an order fixed by K alone, so a row's result does not depend on how
// many rows share the call.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "gguf_blocks.h"

namespace pearlmoe::quant {

enum class DType { kF32, kBF16, kF16 };

struct QLinearParams {
  const void* x;     // [rows, K], row stride x_row_stride, unit last stride, dtype
  const uint8_t* w;  // [N, w_row_bytes]: K / 32 blocks a row
  void* out;         // [rows, N] contiguous, dtype
  int64_t rows, n, k, x_row_stride, w_row_bytes;
  Format format;
  DType dtype;
};

cudaError_t qlinear_cuda(const QLinearParams& p, cudaStream_t stream);

struct DequantizeParams {
  const uint8_t* w;  // [N, w_row_bytes]
  void* out;         // [N, K] contiguous, dtype
  int64_t n, k, w_row_bytes;
  Format format;
  DType dtype;
};

cudaError_t dequantize_cuda(const DequantizeParams& p, cudaStream_t stream);

}  // namespace pearlmoe::quant
