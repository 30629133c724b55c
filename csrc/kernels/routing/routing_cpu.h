// Torch-free CPU routing kernels (one row or one whole batch at a time). csrc/cpu/routing.cpp
// parallelises them over rows; bench/cpp benchmarks them directly.
#pragma once

#include <cmath>
#include <cstdint>

#include "routing_common.h"

namespace pearlmoe::routing {

// One step of a one-pass top-k: offer expert e's key to the best `held` so far, kept in rank
// order in (keys, ids); `held` grows to k. About one compare per expert plus a few insertions.
inline void offer_topk(float key, int e, int k, int& held, float* keys, int32_t* ids) {
  if (held == k && !ranks_before(key, e, keys[k - 1], ids[k - 1])) return;
  int pos = held < k ? held++ : k - 1;  // slot to fill, then bubble it up
  while (pos > 0 && ranks_before(key, e, keys[pos - 1], ids[pos - 1])) {
    keys[pos] = keys[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  keys[pos] = key;
  ids[pos] = e;
}

// Softmax over one row of E router logits, then the top k experts.
//   logits [E] f32 -> weights [k] f32 (softmax probabilities, renormalised over the k on request),
//                     ids [k] int32 (in rank order)
// One pass keeps the best k so far in rank order in the outputs themselves (keys parked in
// `weights`): about E compares plus a few insertions.
inline void topk_softmax_row(const float* logits, int num_experts, int k, bool renormalize,
                             float* weights, int32_t* ids) {
  int held = 0;
  for (int e = 0; e < num_experts; ++e) {
    offer_topk(selection_key(logits[e]), e, k, held, weights, ids);
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

// DeepSeek-V3 / GLM-4.5 routing of one row: sigmoid scores; experts are ranked by score + bias
// (the correction bias steers the selection only); with num_groups > 1 only the topk_groups groups
// whose two best keys sum highest stay in play, and the experts of the other groups get key 0 (as
// HF masks them: still eligible behind negative keys); then the top k keys. The weights are the
// unbiased scores, divided by their sum + 1e-20 on request, times scaling.
//   logits [E] f32, bias [E] f32 or null -> weights [k] f32, ids [k] int32 (rank order)
// `keys` is scratch of E floats.
inline void grouped_topk_row(const float* logits, const float* bias, int num_experts, int k,
                             int num_groups, int topk_groups, bool renormalize, float scaling,
                             float* keys, float* weights, int32_t* ids) {
  for (int e = 0; e < num_experts; ++e) {
    keys[e] = selection_key(sigmoid(logits[e]) + (bias ? bias[e] : 0.f));
  }
  if (num_groups > 1) {
    const int size = num_experts / num_groups;
    float group_key[kGroupedTopkMaxGroups];
    for (int g = 0; g < num_groups; ++g) {
      float best = -INFINITY, second = -INFINITY;
      for (int e = g * size; e < (g + 1) * size; ++e) {
        if (keys[e] > best) {
          second = best;
          best = keys[e];
        } else if (keys[e] > second) {
          second = keys[e];
        }
      }
      group_key[g] = best + second;
    }
    uint32_t kept = 0;
    for (int r = 0; r < topk_groups; ++r) {
      int pick = -1;
      for (int g = 0; g < num_groups; ++g) {
        if ((kept >> g) & 1u) continue;
        if (pick < 0 || ranks_before(group_key[g], g, group_key[pick], pick)) pick = g;
      }
      kept |= 1u << pick;
    }
    for (int e = 0; e < num_experts; ++e) {
      if (!((kept >> (e / size)) & 1u)) keys[e] = 0.f;
    }
  }
  int held = 0;  // the best k so far, in rank order, keys parked in `weights`
  for (int e = 0; e < num_experts; ++e) offer_topk(keys[e], e, k, held, weights, ids);
  float sum = 0.f;
  for (int r = 0; r < k; ++r) {
    weights[r] = sigmoid(logits[ids[r]]);
    sum += weights[r];
  }
  for (int r = 0; r < k; ++r) {
    if (renormalize) weights[r] /= sum + 1e-20f;  // HF's order: divide, then scale
    weights[r] *= scaling;
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
