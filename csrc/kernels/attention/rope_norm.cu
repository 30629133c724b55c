// NeoX RoPE + RMSNorm over head rows: one warp per (token, head) row; each lane owns the pairs
// (i, i + D/2) for i = lane, lane + 32 (D <= 128), so the rotation needs no shuffles and the
// norm one warp reduction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../float_io.cuh"
#include "../launch.cuh"
#include "rope_norm.h"

namespace pearlmoe::attention {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxPairsPerLane = kRopeMaxHeadDim / 64;  // D/2 <= 64 pairs over 32 lanes

using io::load;
using io::store;

template <typename T>
__global__ void rope_norm_kernel(const T* __restrict__ x, T* __restrict__ out,
                                 const int64_t* __restrict__ positions,
                                 const float* __restrict__ weight,
                                 const __grid_constant__ RopeInvFreq inv_freq, int64_t tokens,
                                 int64_t heads, int head_dim, int64_t token_stride,
                                 int64_t head_stride, float eps, bool normalize) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= tokens * heads) return;
  const int64_t t = row / heads, h = row % heads;
  const T* src = x + t * token_stride + h * head_stride;  // [D]
  T* dst = out + row * head_dim;                          // [D]
  const int half = head_dim / 2;
  const float pos = static_cast<float>(positions[t]);

  float lo[kMaxPairsPerLane], hi[kMaxPairsPerLane];
  float sum_sq = 0.f;
#pragma unroll
  for (int s = 0; s < kMaxPairsPerLane; ++s) {
    const int i = lane + 32 * s;
    lo[s] = hi[s] = 0.f;
    if (i < half) {
      float sin_a, cos_a;
      sincosf(pos * inv_freq.v[i], &sin_a, &cos_a);  // the fp32 angle, as HF's tables hold it
      const float a = load(src + i), b = load(src + i + half);
      lo[s] = a * cos_a - b * sin_a;
      hi[s] = b * cos_a + a * sin_a;
      sum_sq += lo[s] * lo[s] + hi[s] * hi[s];
    }
  }
  float inv_rms = 1.f;
  if (normalize) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
    }
    inv_rms = rsqrtf(sum_sq / head_dim + eps);
  }
#pragma unroll
  for (int s = 0; s < kMaxPairsPerLane; ++s) {
    const int i = lane + 32 * s;
    if (i < half) {
      const float w_lo = weight != nullptr ? weight[i] : 1.f;
      const float w_hi = weight != nullptr ? weight[i + half] : 1.f;
      store(dst + i, lo[s] * inv_rms * w_lo);
      store(dst + i + half, hi[s] * inv_rms * w_hi);
    }
  }
}

}  // namespace

cudaError_t rope_norm_cuda(const RopeNormParams& p, cudaStream_t stream) {
  if (p.head_dim % 2 != 0 || p.head_dim > kRopeMaxHeadDim) return cudaErrorInvalidValue;
  const int64_t rows = p.tokens * p.heads;
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return launch_kernel(&rope_norm_kernel<T>, blocks, kWarpsPerBlock * 32, 0, stream,
                         static_cast<const T*>(p.x), static_cast<T*>(p.out), p.positions, p.weight,
                         p.inv_freq, p.tokens, p.heads, static_cast<int>(p.head_dim),
                         p.token_stride, p.head_stride, p.eps, p.normalize);
  };
  switch (p.dtype) {
    case RopeDType::kF32:
      return launch(static_cast<float*>(nullptr));
    case RopeDType::kBF16:
      return launch(static_cast<__nv_bfloat16*>(nullptr));
    case RopeDType::kF16:
      return launch(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace pearlmoe::attention
