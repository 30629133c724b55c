// Routing semantics shared by the CPU and CUDA kernels (and mirrored by reference.py).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common.h"

namespace pearlmoe::routing {

// Largest num_experts moe_align accepts (the CUDA kernel keeps one counter per expert in shared
// memory; the CPU kernel keeps the same limit so both accept the same inputs).
constexpr int kMoeAlignMaxExperts = 8192;

// Experts are ranked by logit, larger first, ties to the lower expert index; a NaN logit ranks as
// -inf. Ranking logits rather than probabilities keeps the ids independent of exp()'s rounding,
// so the CPU and CUDA kernels pick exactly the same experts.
PM_HD float selection_key(float logit) { return logit != logit ? -INFINITY : logit; }

// True when (key_a, a) ranks strictly before (key_b, b) in that total order.
PM_HD bool ranks_before(float key_a, int a, float key_b, int b) {
  return key_a > key_b || (key_a == key_b && a < b);
}

// grouped_topk (DeepSeek-V3 / GLM-4.5 routing): at most this many expert groups (a bit mask).
constexpr int kGroupedTopkMaxGroups = 32;

PM_HD float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// moe_align buckets: experts 0..E-1, then one tail bucket E for dropped slots (id -1, or any
// out-of-range id when the launcher could not check them, e.g. under CUDA-graph capture).
PM_HD int bucket_of(int64_t id, int num_experts) {
  return (id >= 0 && id < num_experts) ? static_cast<int>(id) : num_experts;
}

}  // namespace pearlmoe::routing
