// DeepSeek-V3 / GLM-4.5 routing (sigmoid scores, biased selection, expert groups): one warp per
// token row. Same semantics as routing::grouped_topk_row in routing_cpu.h.
#include <cmath>

#include "../launch.cuh"
#include "routing.h"
#include "routing_common.h"

namespace pearlmoe::routing {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;

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

  // k selection rounds, each the best expert ranked strictly after the previous round's pick.
  float prev_key = 0.f;
  int prev = -1;
  for (int r = 0; r < k; ++r) {
    float best_key = 0.f;
    int best = -1;
    for (int e = lane; e < num_experts; e += 32) {
      const float key = masked_key(e);
      if (prev >= 0 && !ranks_before(prev_key, prev, key, e)) continue;
      if (best < 0 || ranks_before(key, e, best_key, best)) {
        best_key = key;
        best = e;
      }
    }
    reduce_best(best_key, best);
    if (lane == 0) out_ids[r] = best;
    prev_key = best_key;
    prev = best;
  }
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
