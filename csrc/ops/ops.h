// Launchers shared between op files (the composite ops call the routing launchers directly).
#pragma once

#include <ATen/ATen.h>

#ifdef PEARLMOE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <array>
#include <optional>
#include <tuple>

namespace pearlmoe {

std::tuple<at::Tensor, at::Tensor> topk_softmax_cpu(const at::Tensor& router_logits, int64_t k,
                                                    bool renormalize);
std::tuple<at::Tensor, at::Tensor> topk_softmax_cuda(const at::Tensor& router_logits, int64_t k,
                                                     bool renormalize);

std::tuple<at::Tensor, at::Tensor> grouped_topk_cpu(
    const at::Tensor& router_logits, const std::optional<at::Tensor>& correction_bias, int64_t k,
    int64_t num_groups, int64_t topk_groups, bool renormalize, double scaling);
std::tuple<at::Tensor, at::Tensor> grouped_topk_cuda(
    const at::Tensor& router_logits, const std::optional<at::Tensor>& correction_bias, int64_t k,
    int64_t num_groups, int64_t topk_groups, bool renormalize, double scaling);

// Every id must be -1 (dropped) or in [0, num_experts); the error names the first bad slot.
// On CUDA this costs one host sync and is skipped while a CUDA graph is being captured.
void check_expert_ids(const at::Tensor& topk_ids, int64_t num_experts, const char* op);

// Argument checks of the MoE ops, shared with their autograd kernels.
void check_moe_ffn_routed_args(const at::Tensor& x, const at::Tensor& topk_weights,
                               const at::Tensor& topk_ids, const at::Tensor& w13,
                               const at::Tensor& w2, const std::optional<at::Tensor>& shared_w13,
                               const std::optional<at::Tensor>& shared_w2);
void check_moe_ffn_args(const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& w13,
                        const at::Tensor& w2, int64_t top_k,
                        const std::optional<at::Tensor>& shared_w13,
                        const std::optional<at::Tensor>& shared_w2);

// The CPU MoE FFN op (checks, then the decode-sized path or the general one); the fused CPU step
// calls it directly.
at::Tensor moe_ffn_cpu(const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& w13,
                       const at::Tensor& w2, int64_t top_k,
                       const std::optional<at::Tensor>& shared_w13,
                       const std::optional<at::Tensor>& shared_w2, bool renormalize);

// The CPU qlinear op: x [..., K] times a GGUF-block weight (format 'q4_0', 'q4_1' or 'q8_0').
at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& qweight, c10::string_view format);
// The same into out [T, N] (the fused step's scratch): written by the kernel where x is a
// contiguous fp32 / bf16 [T, K] of at most kSkinnyMaxRows rows and out matches it, else copied.
// No ATen op runs in between: inside a step's pool scope an ATen copy of the head's logits
// would open an OpenMP region beside the spinning pool helpers (measured: 4 ms scheduler ticks).
void qlinear_out_cpu(const at::Tensor& x, const at::Tensor& qweight, c10::string_view format,
                     at::Tensor& out);

// RoPE's inverse frequencies base^(-2i/D) for i < D/2 (D <= 128), computed once per (base, D)
// in fp32 as the reference does: [D/2] used of the 64.
using InvFreq = std::array<float, 64>;
const InvFreq& inv_freq_table(double base, int64_t dim);

// A clear error for a CUDA tensor reaching a build without CUDA kernels.
[[noreturn]] void fail_no_cuda(const char* op);

#ifdef PEARLMOE_WITH_CUDA
void check_launch(cudaError_t err, const char* op);
// True while the current CUDA stream is capturing a graph (no host syncs allowed).
bool stream_is_capturing();
#endif

}  // namespace pearlmoe
