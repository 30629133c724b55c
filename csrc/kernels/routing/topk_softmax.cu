// Fused router softmax + top-k: one warp per token row.
#include <cmath>

#include "../launch.cuh"
#include "routing.h"
#include "routing_common.h"
#include "routing_warp.cuh"

namespace pearlmoe::routing {
namespace {

// The k experts by logit (select_topk; keys re-read from L1/L2 each round), then their softmax
// probabilities with the top-1 logit as the shift.
__global__ void topk_softmax_kernel(const float* __restrict__ logits, int64_t row_stride,
                                    int64_t num_tokens, int num_experts, int k, bool renormalize,
                                    float* __restrict__ weights, int32_t* __restrict__ ids) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_tokens) return;               // whole warps exit together
  const float* x = logits + row * row_stride;  // [E]
  float* w = weights + row * k;                // [k]
  int32_t* out_ids = ids + row * k;            // [k]

  const float shift =
      select_topk(num_experts, k, lane, [&](int e) { return selection_key(x[e]); }, out_ids);

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
