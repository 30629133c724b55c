// Routing ops: argument checks, output allocation, and the CPU / CUDA registrations.
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "../cpu/cpu_kernels.h"
#include "../kernels/routing/routing_common.h"
#include "checks.h"
#include "ops.h"

#ifdef PEARLMOE_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/routing/routing.h"
#endif

namespace pearlmoe {
namespace {

using at::Tensor;
constexpr const char* kTopk = "topk_softmax";
constexpr const char* kAlign = "moe_align";
constexpr const char* kGrouped = "grouped_topk";

// ---- topk_softmax ------------------------------------------------------------------------------

// router_logits [T, E] f32 with 1 <= E <= INT_MAX and 1 <= k <= E (both top-k ops).
void check_router_logits(const Tensor& logits, int64_t k, const char* op) {
  check_dim(logits, 2, op, "router_logits");
  check_dtype(logits, at::kFloat, op, "router_logits");
  const int64_t num_experts = logits.size(1);
  PM_CHECK(num_experts >= 1 && num_experts <= INT_MAX, op,
           "router_logits must have between 1 and INT_MAX expert columns, got shape ",
           logits.sizes());
  PM_CHECK(k >= 1 && k <= num_experts, op, "k must be in [1, num_experts=", num_experts, "], got ",
           k);
}

std::tuple<Tensor, Tensor> alloc_topk_outputs(const Tensor& logits, int64_t k) {
  const int64_t num_tokens = logits.size(0);
  return {at::empty({num_tokens, k}, logits.options()),
          at::empty({num_tokens, k}, logits.options().dtype(at::kInt))};
}

}  // namespace

std::tuple<Tensor, Tensor> topk_softmax_cpu(const Tensor& router_logits, int64_t k,
                                            bool renormalize) {
  check_device(router_logits, c10::kCPU, kTopk, "router_logits");
  check_router_logits(router_logits, k, kTopk);
  const Tensor logits = router_logits.contiguous();  // [T, E]
  auto [weights, ids] = alloc_topk_outputs(logits, k);
  cpu::topk_softmax(logits, k, renormalize, weights, ids);
  return {weights, ids};
}

// ---- grouped_topk ------------------------------------------------------------------------------

namespace {

// Checks the arguments; returns the bias as a contiguous fp32 tensor on the logits' device (or
// undefined when there is none).
Tensor check_grouped_topk(const Tensor& logits, const std::optional<Tensor>& bias, int64_t k,
                          int64_t num_groups, int64_t topk_groups) {
  check_router_logits(logits, k, kGrouped);
  const int64_t num_experts = logits.size(1);
  PM_CHECK(num_groups >= 1 && num_groups <= routing::kGroupedTopkMaxGroups, kGrouped,
           "num_groups must be in [1, ", routing::kGroupedTopkMaxGroups, "], got ", num_groups);
  PM_CHECK(num_experts % num_groups == 0, kGrouped, "num_groups=", num_groups, " must divide the ",
           num_experts, " experts");
  PM_CHECK(num_groups == 1 || num_experts / num_groups >= 2, kGrouped,
           "groups must hold at least 2 experts (a group's score sums its best two), got ",
           num_experts / num_groups);
  PM_CHECK(topk_groups >= 1 && topk_groups <= num_groups, kGrouped,
           "topk_groups must be in [1, num_groups=", num_groups, "], got ", topk_groups);
  if (!bias.has_value()) return Tensor();
  check_dtype(*bias, at::kFloat, kGrouped, "correction_bias");
  check_dim(*bias, 1, kGrouped, "correction_bias");
  PM_CHECK(bias->size(0) == num_experts, kGrouped,
           "correction_bias must have num_experts=", num_experts, " entries, got ", bias->size(0));
  check_device(*bias, logits.device().type(), kGrouped, "correction_bias");
  return bias->contiguous();
}

}  // namespace

std::tuple<Tensor, Tensor> grouped_topk_cpu(const Tensor& router_logits,
                                            const std::optional<Tensor>& correction_bias, int64_t k,
                                            int64_t num_groups, int64_t topk_groups,
                                            bool renormalize, double scaling) {
  check_device(router_logits, c10::kCPU, kGrouped, "router_logits");
  const Tensor bias =
      check_grouped_topk(router_logits, correction_bias, k, num_groups, topk_groups);
  const Tensor logits = router_logits.contiguous();  // [T, E]
  auto [weights, ids] = alloc_topk_outputs(logits, k);
  cpu::grouped_topk(logits, bias.defined() ? bias.const_data_ptr<float>() : nullptr, k, num_groups,
                    topk_groups, renormalize, scaling, weights, ids);
  return {weights, ids};
}

// ---- moe_align ---------------------------------------------------------------------------------

namespace {

void check_moe_align(const Tensor& topk_ids, int64_t num_experts) {
  check_dim(topk_ids, 2, kAlign, "topk_ids");
  check_int_dtype(topk_ids, kAlign, "topk_ids");
  PM_CHECK(num_experts >= 1 && num_experts <= routing::kMoeAlignMaxExperts, kAlign,
           "num_experts must be in [1, ", routing::kMoeAlignMaxExperts, "], got ", num_experts);
  PM_CHECK(topk_ids.numel() < INT_MAX, kAlign, "topk_ids has ", topk_ids.numel(),
           " slots; rows are int32, so at most INT_MAX - 1 are supported");
}

std::tuple<Tensor, Tensor, Tensor> alloc_align_outputs(const Tensor& topk_ids,
                                                       int64_t num_experts) {
  const auto opts = topk_ids.options().dtype(at::kInt);
  return {at::empty({topk_ids.numel()}, opts), at::empty({topk_ids.numel()}, opts),
          at::empty({num_experts + 1}, opts)};
}

}  // namespace

[[noreturn]] void fail_no_cuda(const char* op) {
  PM_CHECK(false, op,
           "got CUDA tensors, but this pearlmoe build has no CUDA kernels (it was built against a "
           "CPU-only torch or with WITH_CUDA=OFF); reinstall with a CUDA torch and nvcc present");
  __builtin_unreachable();
}

[[noreturn]] void fail_bad_id(const Tensor& topk_ids, int64_t slot, int64_t num_experts,
                              const char* op) {
  const int64_t k = topk_ids.size(1);
  const int64_t value = topk_ids.reshape(-1)[slot].item<int64_t>();
  PM_CHECK(false, op, "topk_ids[", slot / k, ", ", slot % k, "] = ", value,
           " is out of range: ids must be -1 (dropped) or in [0, num_experts=", num_experts, ")");
  __builtin_unreachable();
}

void check_expert_ids(const Tensor& topk_ids, int64_t num_experts, const char* op) {
  if (topk_ids.numel() == 0) return;
#ifdef PEARLMOE_WITH_CUDA
  if (topk_ids.is_cuda() && stream_is_capturing()) return;
#endif
  const Tensor ids = host_values(topk_ids);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "check_expert_ids", [&] {
    const index_t* id = ids.const_data_ptr<index_t>();
    for (int64_t s = 0; s < ids.numel(); ++s) {
      if (id[s] < -1 || id[s] >= num_experts) fail_bad_id(ids, s, num_experts, op);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> moe_align_cpu(const Tensor& topk_ids_in, int64_t num_experts) {
  check_device(topk_ids_in, c10::kCPU, kAlign, "topk_ids");
  check_moe_align(topk_ids_in, num_experts);
  const Tensor topk_ids = topk_ids_in.contiguous();  // [T, k]
  auto [sorted_slots, slot_to_row, offsets] = alloc_align_outputs(topk_ids, num_experts);
  const int64_t bad = cpu::moe_align(topk_ids, num_experts, sorted_slots, slot_to_row, offsets);
  if (bad >= 0) fail_bad_id(topk_ids, bad, num_experts, kAlign);
  return {sorted_slots, slot_to_row, offsets};
}

// ---- CUDA --------------------------------------------------------------------------------------

#ifdef PEARLMOE_WITH_CUDA

void check_launch(cudaError_t err, const char* op) {
  PM_CHECK(err == cudaSuccess, op, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

std::tuple<Tensor, Tensor> topk_softmax_cuda(const Tensor& router_logits, int64_t k,
                                             bool renormalize) {
  check_device(router_logits, c10::kCUDA, kTopk, "router_logits");
  check_router_logits(router_logits, k, kTopk);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const Tensor logits = router_logits.contiguous();  // [T, E]
  auto [weights, ids] = alloc_topk_outputs(logits, k);
  check_launch(
      routing::topk_softmax_cuda(logits.const_data_ptr<float>(), logits.size(1), logits.size(0),
                                 static_cast<int>(logits.size(1)), static_cast<int>(k), renormalize,
                                 weights.mutable_data_ptr<float>(), ids.mutable_data_ptr<int32_t>(),
                                 c10::cuda::getCurrentCUDAStream().stream()),
      kTopk);
  return {weights, ids};
}

std::tuple<Tensor, Tensor> grouped_topk_cuda(const Tensor& router_logits,
                                             const std::optional<Tensor>& correction_bias,
                                             int64_t k, int64_t num_groups, int64_t topk_groups,
                                             bool renormalize, double scaling) {
  check_device(router_logits, c10::kCUDA, kGrouped, "router_logits");
  const Tensor bias =
      check_grouped_topk(router_logits, correction_bias, k, num_groups, topk_groups);
  PM_CHECK(!bias.defined() || bias.device() == router_logits.device(), kGrouped,
           "correction_bias must be on router_logits' device ", router_logits.device(), ", got ",
           bias.defined() ? bias.device() : router_logits.device());
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const Tensor logits = router_logits.contiguous();  // [T, E]
  auto [weights, ids] = alloc_topk_outputs(logits, k);
  check_launch(routing::grouped_topk_cuda(
                   logits.const_data_ptr<float>(), logits.size(1),
                   bias.defined() ? bias.const_data_ptr<float>() : nullptr, logits.size(0),
                   static_cast<int>(logits.size(1)), static_cast<int>(k),
                   static_cast<int>(num_groups), static_cast<int>(topk_groups), renormalize,
                   static_cast<float>(scaling), weights.mutable_data_ptr<float>(),
                   ids.mutable_data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream()),
               kGrouped);
  return {weights, ids};
}

std::tuple<Tensor, Tensor, Tensor> moe_align_cuda(const Tensor& topk_ids_in, int64_t num_experts) {
  check_device(topk_ids_in, c10::kCUDA, kAlign, "topk_ids");
  check_moe_align(topk_ids_in, num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids_in.device());
  const Tensor topk_ids = topk_ids_in.contiguous();  // [T, k]
  // moe_ffn calls the kernel without this check: its ids come from topk_softmax.
  check_expert_ids(topk_ids, num_experts, kAlign);
  auto [sorted_slots, slot_to_row, offsets] = alloc_align_outputs(topk_ids, num_experts);
  const int64_t n = topk_ids.numel();
  const Tensor workspace = at::empty(
      {static_cast<int64_t>(routing::moe_align_workspace_bytes(n, static_cast<int>(num_experts)))},
      topk_ids.options().dtype(at::kByte));
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = AT_DISPATCH_INDEX_TYPES(topk_ids.scalar_type(), "moe_align_cuda", [&] {
    return routing::moe_align_cuda<index_t>(
        topk_ids.const_data_ptr<index_t>(), n, static_cast<int>(num_experts),
        sorted_slots.mutable_data_ptr<int32_t>(), slot_to_row.mutable_data_ptr<int32_t>(),
        offsets.mutable_data_ptr<int32_t>(), workspace.data_ptr(), stream);
  });
  check_launch(err, kAlign);
  return {sorted_slots, slot_to_row, offsets};
}

#else  // !PEARLMOE_WITH_CUDA: a clear error instead of the dispatcher's "no kernel for CUDA".

std::tuple<Tensor, Tensor> topk_softmax_cuda(const Tensor&, int64_t, bool) { fail_no_cuda(kTopk); }
std::tuple<Tensor, Tensor> grouped_topk_cuda(const Tensor&, const std::optional<Tensor>&, int64_t,
                                             int64_t, int64_t, bool, double) {
  fail_no_cuda(kGrouped);
}

namespace {
std::tuple<Tensor, Tensor, Tensor> moe_align_cuda(const Tensor&, int64_t) { fail_no_cuda(kAlign); }
}  // namespace

#endif

TORCH_LIBRARY_IMPL(pearlmoe, CPU, m) {
  m.impl("topk_softmax", &topk_softmax_cpu);
  m.impl("grouped_topk", &grouped_topk_cpu);
  m.impl("moe_align", &moe_align_cpu);
}

TORCH_LIBRARY_IMPL(pearlmoe, CUDA, m) {
  m.impl("topk_softmax", &topk_softmax_cuda);
  m.impl("grouped_topk", &grouped_topk_cuda);
  m.impl("moe_align", &moe_align_cuda);
}

}  // namespace pearlmoe
