// DeepSeek-V3 / GLM-4.5 routing (sigmoid scores, biased selection, expert groups): one warp per
// token row. Same semantics as routing::grouped_topk_row in routing_cpu.h.
#include <cmath>

#include "../launch.cuh"
#include "routing.h"
#include "routing_common.h"
#include "routing_warp.cuh"

namespace pearlmoe::routing {
namespace {

__global__ void grouped_topk_kernel(const float* __restrict__ logits, int64_t row_stride,
                                    const float* __restrict__ bias, int64_t num_tokens,
                                    int num_experts, int k, int num_groups, int topk_groups,
                                    bool renormalize, float scaling, float* __restrict__ weights,
                                    int32_t* __restrict__ ids) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_tokens) return;               // whole warps exit together
  const float* x = logits + row * row_stride;  // [E]
  float* w = weights + row * k;                // [k]
  int32_t* out_ids = ids + row * k;            // [k]
  auto key_of = [&](int e) { return selection_key(sigmoid(x[e]) + (bias ? bias[e] : 0.f)); };

  // Groups: lane g scores group g (the sum of its two best keys), then topk_groups warp argmax
  // rounds pick the groups that stay in play (a bit each).
  const int size = num_experts / num_groups;
  uint32_t kept = kFullMask;
  if (num_groups > 1) {
    float group_key = -INFINITY;
    if (lane < num_groups) {
      float best = -INFINITY, second = -INFINITY;
      for (int e = lane * size; e < (lane + 1) * size; ++e) {
        const float v = key_of(e);
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      group_key = best + second;
    }
    kept = 0;
    for (int r = 0; r < topk_groups; ++r) {
      float key = group_key;
      int idx = (lane < num_groups && !((kept >> lane) & 1u)) ? lane : -1;
      reduce_best(key, idx);
      kept |= 1u << idx;
    }
  }
  auto masked_key = [&](int e) { return ((kept >> (e / size)) & 1u) ? key_of(e) : 0.f; };

  select_topk(num_experts, k, lane, masked_key, out_ids);
  __syncwarp();  // lane 0's id stores are visible to the warp

  float sum = 0.f;
  for (int r = lane; r < k; r += 32) {
    w[r] = sigmoid(x[out_ids[r]]);
    sum += w[r];
  }
  sum = reduce_sum(sum);
  for (int r = lane; r < k; r += 32) {
    float v = w[r];
    if (renormalize) v /= sum + 1e-20f;
    w[r] = v * scaling;
  }
}

}  // namespace

cudaError_t grouped_topk_cuda(const float* router_logits, int64_t row_stride,
                              const float* correction_bias, int64_t num_tokens, int num_experts,
                              int k, int num_groups, int topk_groups, bool renormalize,
                              float scaling, float* weights, int32_t* ids, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int64_t blocks = (num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return launch_kernel(&grouped_topk_kernel, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0,
                       stream, router_logits, row_stride, correction_bias, num_tokens, num_experts,
                       k, num_groups, topk_groups, renormalize, scaling, weights, ids);
}

}  // namespace pearlmoe::routing
