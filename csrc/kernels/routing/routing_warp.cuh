// Warp-level pieces of the routing kernels (one warp per token row): the best (key, index) and a
// sum across the warp, and the k selection rounds both top-k kernels run.
#pragma once

#include <cstdint>

#include "routing_common.h"

namespace pearlmoe::routing {

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

// k selection rounds over the row's keys (key_of(e), re-evaluated each round, so no per-row
// scratch is needed for any E or k): round r takes the best expert ranked strictly after round
// r-1's pick. Lane 0 writes ids [k]; returns the top-1 key (every lane).
template <typename KeyOf>
__device__ __forceinline__ float select_topk(int num_experts, int k, int lane, KeyOf key_of,
                                             int32_t* ids) {
  float prev_key = 0.f, top = 0.f;
  int prev = -1;
  for (int r = 0; r < k; ++r) {
    float best_key = 0.f;
    int best = -1;
    for (int e = lane; e < num_experts; e += 32) {
      const float key = key_of(e);
      if (prev >= 0 && !ranks_before(prev_key, prev, key, e)) continue;
      if (best < 0 || ranks_before(key, e, best_key, best)) {
        best_key = key;
        best = e;
      }
    }
    reduce_best(best_key, best);
    if (lane == 0) ids[r] = best;
    if (r == 0) top = best_key;
    prev_key = best_key;
    prev = best;
  }
  return top;
}

}  // namespace pearlmoe::routing
