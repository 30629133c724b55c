#include <ATen/Parallel.h>

#include <vector>

#include "../kernels/routing/routing_cpu.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace pearlmoe::cpu {

void topk_softmax(const at::Tensor& logits, int64_t k, bool renormalize, at::Tensor& weights,
                  at::Tensor& ids) {
  const int64_t num_tokens = logits.size(0);
  const int num_experts = static_cast<int>(logits.size(1));
  const float* x = logits.const_data_ptr<float>();
  float* w = weights.mutable_data_ptr<float>();
  int32_t* out_ids = ids.mutable_data_ptr<int32_t>();
  // ~k*E compares per row: a grain of a few thousand rows keeps small decode batches on one thread.
  cpu::parallel_for(0, num_tokens, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      routing::topk_softmax_row(x + t * num_experts, num_experts, static_cast<int>(k), renormalize,
                                w + t * k, out_ids + t * k);
    }
  });
}

void grouped_topk(const at::Tensor& logits, const float* bias, int64_t k, int64_t num_groups,
                  int64_t topk_groups, bool renormalize, double scaling, at::Tensor& weights,
                  at::Tensor& ids) {
  const int64_t num_tokens = logits.size(0);
  const int num_experts = static_cast<int>(logits.size(1));
  const float* x = logits.const_data_ptr<float>();
  float* w = weights.mutable_data_ptr<float>();
  int32_t* out_ids = ids.mutable_data_ptr<int32_t>();
  cpu::parallel_for(0, num_tokens, 1024, [&](int64_t begin, int64_t end) {
    std::vector<float> keys(num_experts);
    for (int64_t t = begin; t < end; ++t) {
      routing::grouped_topk_row(x + t * num_experts, bias, num_experts, static_cast<int>(k),
                                static_cast<int>(num_groups), static_cast<int>(topk_groups),
                                renormalize, static_cast<float>(scaling), keys.data(), w + t * k,
                                out_ids + t * k);
    }
  });
}

int64_t moe_align(const at::Tensor& topk_ids, int64_t num_experts, at::Tensor& sorted_slots,
                  at::Tensor& slot_to_row, at::Tensor& expert_offsets) {
  // A counting sort is one pass of cheap integer work: serial beats the cost of splitting it.
  std::vector<int32_t> counts(num_experts + 1);
  return AT_DISPATCH_INDEX_TYPES(topk_ids.scalar_type(), "moe_align_cpu", [&] {
    return routing::moe_align(
        topk_ids.const_data_ptr<index_t>(), topk_ids.numel(), static_cast<int>(num_experts),
        sorted_slots.mutable_data_ptr<int32_t>(), slot_to_row.mutable_data_ptr<int32_t>(),
        expert_offsets.mutable_data_ptr<int32_t>(), counts.data());
  });
}

}  // namespace pearlmoe::cpu
