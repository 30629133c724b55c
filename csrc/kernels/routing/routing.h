// Torch-free CUDA launchers for the routing kernels. All pointers are device pointers; every
// launcher enqueues on `stream`, never synchronises, and returns the launch error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "routing_common.h"

namespace pearlmoe::routing {

// router_logits [T, E] f32 (rows `row_stride` floats apart, unit column stride)
//   -> weights [T, k] f32, ids [T, k] int32. Needs 1 <= k <= E.
cudaError_t topk_softmax_cuda(const float* router_logits, int64_t row_stride, int64_t num_tokens,
                              int num_experts, int k, bool renormalize, float* weights,
                              int32_t* ids, cudaStream_t stream);

// DeepSeek-V3 / GLM-4.5 routing, the semantics of routing::grouped_topk_row (routing_cpu.h):
// router_logits [T, E] f32 (rows `row_stride` floats apart), correction_bias [E] f32 or null
//   -> weights [T, k] f32, ids [T, k] int32. Needs 1 <= k <= E, E % num_groups == 0,
// 1 <= topk_groups <= num_groups <= kGroupedTopkMaxGroups and groups of >= 2 experts when
// num_groups > 1.
cudaError_t grouped_topk_cuda(const float* router_logits, int64_t row_stride,
                              const float* correction_bias, int64_t num_tokens, int num_experts,
                              int k, int num_groups, int topk_groups, bool renormalize,
                              float scaling, float* weights, int32_t* ids, cudaStream_t stream);

// Scratch bytes moe_align_cuda needs for `num_slots` slots and `num_experts` experts.
size_t moe_align_workspace_bytes(int64_t num_slots, int num_experts);

// topk_ids [N] (int32 or int64, N = T*k, flattened row-major)
//   -> sorted_slots [N] int32, slot_to_row [N] int32, expert_offsets [E+1] int32.
// Same contract as routing::moe_align in routing_cpu.h, except that out-of-range ids are not
// reported: every id outside [0, E) is treated as dropped (-1). Deterministic.
template <typename IdT>
cudaError_t moe_align_cuda(const IdT* topk_ids, int64_t num_slots, int num_experts,
                           int32_t* sorted_slots, int32_t* slot_to_row, int32_t* expert_offsets,
                           void* workspace, cudaStream_t stream);

}  // namespace pearlmoe::routing
