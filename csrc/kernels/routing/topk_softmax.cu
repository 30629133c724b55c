// Fused router softmax + top-k: one warp per token row.
#include <cmath>

#include "../launch.cuh"
#include "routing.h"
#include "routing_common.h"

namespace pearlmoe::routing {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;

// Keep the better of (key, idx) and the lane `offset` away; idx < 0 means "nothing yet".
__device__ __forceinline__ void reduce_best(float& key, int& idx) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_key = __shfl_xor_sync(kFullMask, key, offset);
    const int other_idx = __shfl_xor_sync(kFullMask, idx, offset);
    if (other_idx >= 0 && (idx < 0 || ranks_before(other_key, other_idx, key, idx))) {
      key = other_key;
      idx = other_idx;
    }
  }
}

__device__ __forceinline__ float reduce_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// k selection rounds over the row (re-read from L1/L2 each round): round r takes the best expert
// ranked strictly after round r-1's pick, so no per-row scratch is needed for any E or k.
__global__ void topk_softmax_kernel(const float* __restrict__ logits, int64_t row_stride,
                                    int64_t num_tokens, int num_experts, int k, bool renormalize,
                                    float* __restrict__ weights, int32_t* __restrict__ ids) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_tokens) return;               // whole warps exit together
  const float* x = logits + row * row_stride;  // [E]
  float* w = weights + row * k;                // [k]
  int32_t* out_ids = ids + row * k;            // [k]

  float prev_key = 0.f, shift = 0.f;
  int prev = -1;
  for (int r = 0; r < k; ++r) {
    float best_key = 0.f;
    int best = -1;
    for (int e = lane; e < num_experts; e += 32) {
      const float key = selection_key(x[e]);
      if (prev >= 0 && !ranks_before(prev_key, prev, key, e)) continue;
      if (best < 0 || ranks_before(key, e, best_key, best)) {
        best_key = key;
        best = e;
      }
    }
    reduce_best(best_key, best);
    if (lane == 0) out_ids[r] = best;
    if (r == 0) shift = best_key;
    prev_key = best_key;
    prev = best;
  }

  float sum = 0.f;
  for (int e = lane; e < num_experts; e += 32) sum += expf(x[e] - shift);
  sum = reduce_sum(sum);
  __syncwarp();  // lane 0's id stores are visible to the warp

  float picked = 0.f;
  for (int r = lane; r < k; r += 32) {
    const float p = expf(x[out_ids[r]] - shift) / sum;
    w[r] = p;
    picked += p;
  }
  if (renormalize) {
    picked = reduce_sum(picked);
    for (int r = lane; r < k; r += 32) w[r] /= picked;
  }
}

}  // namespace

cudaError_t topk_softmax_cuda(const float* router_logits, int64_t row_stride, int64_t num_tokens,
                              int num_experts, int k, bool renormalize, float* weights,
                              int32_t* ids, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int64_t blocks = (num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return launch_kernel(&topk_softmax_kernel, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0,
                       stream, router_logits, row_stride, num_tokens, num_experts, k, renormalize,
                       weights, ids);
}

}  // namespace pearlmoe::routing
