// Autograd for topk_softmax, in C++ so that calls without gradients never enter Python.
// Kept apart from routing.cpp because the autograd headers are slow to compile.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace pearlmoe {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class TopkSoftmaxFunction : public torch::autograd::Function<TopkSoftmaxFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& router_logits, int64_t k,
                               bool renormalize) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pearlmoe::topk_softmax", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, int64_t, bool)>();
    auto [weights, ids] = op.call(router_logits, k, renormalize);
    ctx->save_for_backward({router_logits, weights, ids});
    ctx->saved_data["renormalize"] = renormalize;
    ctx->mark_non_differentiable({ids});
    return {weights, ids};
  }

  // Both forms are a softmax Jacobian: w_j = p[id_j] of the full softmax p, or (renormalised)
  // w = softmax over the k chosen logits. grad = s * (G - sum_j g_j w_j), where G scatters the
  // incoming gradient to the chosen experts and s is p, or w scattered likewise.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];                                           // [T, E]
    const Tensor& weights = saved[1];                                          // [T, k]
    const Tensor ids = saved[2].to(at::kLong);                                 // [T, k]
    const Tensor g = grads[0].defined() ? grads[0] : at::zeros_like(weights);  // [T, k]
    const Tensor dot = (g * weights).sum(-1, /*keepdim=*/true);                // [T, 1]
    const Tensor scattered = at::zeros_like(logits).scatter_(1, ids, g);       // [T, E]
    const Tensor s = ctx->saved_data["renormalize"].toBool()
                         ? at::zeros_like(logits).scatter_(1, ids, weights)
                         : at::softmax(logits, -1);
    return {s * (scattered - dot), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> topk_softmax_autograd(const Tensor& router_logits, int64_t k,
                                                 bool renormalize) {
  auto out = TopkSoftmaxFunction::apply(router_logits, k, renormalize);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, Autograd, m) { m.impl("topk_softmax", &topk_softmax_autograd); }

}  // namespace pearlmoe
