// Torch-free CPU routing kernels (one row or one whole batch at a time). csrc/cpu/routing.cpp
// parallelises them over rows; bench/cpp benchmarks them directly.
#pragma once

#include <cmath>
#include <cstdint>

#include "routing_common.h"

namespace pearlmoe::routing {

// Softmax over one row of E router logits, then the top k experts.
//   logits [E] f32 -> weights [k] f32 (softmax probabilities, renormalised over the k on request),
//                     ids [k] int32 (in rank order)
// One pass keeps the best k so far in rank order in the outputs themselves (keys parked in
// `weights`): about E compares plus a few insertions.
inline void topk_softmax_row(const float* logits, int num_experts, int k, bool renormalize,
                             float* weights, int32_t* ids) {
  int kept = 0;
  for (int e = 0; e < num_experts; ++e) {
    const float key = selection_key(logits[e]);
    if (kept == k && !ranks_before(key, e, weights[k - 1], ids[k - 1])) continue;
    int pos = kept < k ? kept++ : k - 1;  // slot to fill, then bubble it up
    while (pos > 0 && ranks_before(key, e, weights[pos - 1], ids[pos - 1])) {
      weights[pos] = weights[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    weights[pos] = key;
    ids[pos] = e;
  }
  // Softmax with the top-1 key as the shift (a NaN or all -inf row gives NaN, as torch does).
  const float shift = selection_key(logits[ids[0]]);
  // A double accumulator keeps the serial sum as accurate as torch's pairwise one for any E.
  double acc = 0.0;
  for (int e = 0; e < num_experts; ++e) acc += std::exp(logits[e] - shift);
  const float sum = static_cast<float>(acc);
  float picked = 0.f;
  for (int r = 0; r < k; ++r) {
    weights[r] = std::exp(logits[ids[r]] - shift) / sum;
    picked += weights[r];
  }
  if (renormalize) {
    for (int r = 0; r < k; ++r) weights[r] /= picked;
  }
}

// Stable counting sort of N = T*k token-slots by expert.
//   topk_ids [N] -> sorted_slots [N]: row j of the expert-grouped order holds slot sorted_slots[j]
//                   slot_to_row [N]: the inverse permutation
//                   expert_offsets [E+1]: expert e owns rows offsets[e]:offsets[e+1]
// Slots whose id is -1 are dropped: they follow offsets[E], still in slot order.
// `counts` is scratch of E+1 ints. Returns the first slot whose id is neither -1 nor in [0, E),
// or -1 when all ids are valid (the outputs are complete either way).
template <typename IdT>
int64_t moe_align(const IdT* topk_ids, int64_t num_slots, int num_experts, int32_t* sorted_slots,
                  int32_t* slot_to_row, int32_t* expert_offsets, int32_t* counts) {
  int64_t first_bad = -1;
  for (int b = 0; b <= num_experts; ++b) counts[b] = 0;
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t id = static_cast<int64_t>(topk_ids[s]);
    if (first_bad < 0 && (id < -1 || id >= num_experts)) first_bad = s;
    ++counts[bucket_of(id, num_experts)];
  }
  int32_t start = 0;
  for (int b = 0; b <= num_experts; ++b) {
    const int32_t c = counts[b];
    counts[b] = start;  // becomes the next free row of bucket b
    expert_offsets[b] = start;
    start += c;
  }
  for (int64_t s = 0; s < num_slots; ++s) {
    const int row = counts[bucket_of(static_cast<int64_t>(topk_ids[s]), num_experts)]++;
    sorted_slots[row] = static_cast<int32_t>(s);
    slot_to_row[s] = row;
  }
  return first_bad;
}

}  // namespace pearlmoe::routing
