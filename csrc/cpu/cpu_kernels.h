// CPU kernels (ATen tensors in, parallelised with at::parallel_for). Inputs are already checked
// by csrc/ops; outputs are preallocated.
#pragma once

#include <ATen/ATen.h>

namespace pearlmoe::cpu {

// logits [T, E] f32 contiguous -> weights [T, k] f32, ids [T, k] int32
void topk_softmax(const at::Tensor& logits, int64_t k, bool renormalize, at::Tensor& weights,
                  at::Tensor& ids);

// topk_ids [T, k] int32|int64 contiguous -> sorted_slots [N], slot_to_row [N], offsets [E+1]
// Returns the first slot holding an id outside {-1} U [0, E), or -1.
int64_t moe_align(const at::Tensor& topk_ids, int64_t num_experts, at::Tensor& sorted_slots,
                  at::Tensor& slot_to_row, at::Tensor& expert_offsets);

}  // namespace pearlmoe::cpu
