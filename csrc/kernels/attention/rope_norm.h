// Torch-free NeoX RoPE + QK RMSNorm (Hunyuan-Large applies the norm after RoPE). Shared by the
// CPU kernel (per row) and the CUDA kernel (one warp per row).
//
// For one head row x [D] at position p, with inv_freq[i] = 1 / base^(2i/D), i < D/2 (a table the
// caller builds once, as HF does, so every device rotates by the same fp32 angles p·inv_freq[i]):
//     r[i]       = x[i] cos(p·inv_freq[i]) - x[i + D/2] sin(p·inv_freq[i])
//     r[i + D/2] = x[i + D/2] cos(p·inv_freq[i]) + x[i] sin(p·inv_freq[i])
// then, with normalisation on, out = r / sqrt(mean(r²) + eps) · weight (weight may be null).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pearlmoe::attention {

enum class RopeDType { kF32, kBF16, kF16 };

constexpr int kRopeMaxHeadDim = 128;

// The table travels by value in the kernel's parameters: a call reads no host table and copies
// nothing to the device, so it can be captured in a CUDA graph.
struct RopeInvFreq {
  float v[kRopeMaxHeadDim / 2];  // [D/2] used
};

struct RopeNormParams {
  const void* x;             // [T, H, D] with row stride (per token) and head stride, unit last
  void* out;                 // [T, H, D] contiguous
  const int64_t* positions;  // [T] device
  const float* weight;       // [D] fp32 or null (the query's weight times the folded key weight)
  RopeInvFreq inv_freq;
  int64_t tokens, heads, head_dim, token_stride, head_stride;
  float eps;
  bool normalize;
  RopeDType dtype;
};

cudaError_t rope_norm_cuda(const RopeNormParams& p, cudaStream_t stream);

}  // namespace pearlmoe::attention
