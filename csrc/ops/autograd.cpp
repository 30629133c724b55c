// Autograd kernels of every differentiable op, in C++ so that calls without gradients never
// enter Python. Kept in one file because the autograd headers are slow to compile.
//   topk_softmax, grouped_gemm: torch::autograd::Function with an analytic backward;
//   moe_ffn_routed, moe_ffn: without gradients, straight to the fused CPU/CUDA kernel; with
//   them, the same math composed of differentiable ops, so the backward is grouped GEMMs.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "ops.h"

namespace pearlmoe {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptTensor = std::optional<Tensor>;

// Typed handles to the ops, looked up once.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

std::tuple<Tensor, Tensor> call_topk_softmax(const Tensor& logits, int64_t k, bool renormalize) {
  static auto op =
      op_handle<std::tuple<Tensor, Tensor>(const Tensor&, int64_t, bool)>("pearlmoe::topk_softmax");
  return op.call(logits, k, renormalize);
}

std::tuple<Tensor, Tensor, Tensor> call_moe_align(const Tensor& ids, int64_t num_experts) {
  static auto op =
      op_handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t)>("pearlmoe::moe_align");
  return op.call(ids, num_experts);
}

Tensor call_grouped_gemm(const Tensor& a, const Tensor& b, const Tensor& offs) {
  static auto op =
      op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("pearlmoe::grouped_gemm");
  return op.call(a, b, offs);
}

Tensor call_grouped_gemm_wgrad(const Tensor& grad_c, const Tensor& a, const Tensor& offs) {
  static auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>(
      "pearlmoe::grouped_gemm_wgrad");
  return op.call(grad_c, a, offs);
}

using RoutedSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const OptTensor&, const OptTensor&);
using MoeSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                      const OptTensor&, const OptTensor&, bool);

bool requires_grad(std::initializer_list<const Tensor*> tensors,
                   std::initializer_list<const OptTensor*> optional = {}) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : tensors) {
    if (t->requires_grad()) return true;
  }
  for (const OptTensor* t : optional) {
    if (t->has_value() && (*t)->requires_grad()) return true;
  }
  return false;
}

class TopkSoftmaxFunction : public torch::autograd::Function<TopkSoftmaxFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& router_logits, int64_t k,
                               bool renormalize) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, ids] = call_topk_softmax(router_logits, k, renormalize);
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

// c[rows of g] = a[rows of g] · b[g]^T. Backward: da = grouped_gemm(dc, b^T) (b transposed per
// group), db[g] = dc[rows of g]^T · a[rows of g]. Rows past offs[G] are constant zeros.
class GroupedGemmFunction : public torch::autograd::Function<GroupedGemmFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b,
                        const Tensor& group_offsets) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({a, b, group_offsets});
    return call_grouped_gemm(a, b, group_offsets);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &a = saved[0], &b = saved[1], &offs = saved[2];
    const Tensor dc = grads[0].contiguous();  // [M, N]
    Tensor da, db;
    if (ctx->needs_input_grad(0)) da = call_grouped_gemm(dc, b.transpose(1, 2).contiguous(), offs);
    if (ctx->needs_input_grad(1)) db = call_grouped_gemm_wgrad(dc, a, offs);
    return {da, db, Tensor()};
  }
};

Tensor grouped_gemm_autograd(const Tensor& a, const Tensor& b, const Tensor& group_offsets) {
  return GroupedGemmFunction::apply(a, b, group_offsets);
}

// silu(h[:, :I]) * h[:, I:]
Tensor swiglu(const Tensor& h) {
  const auto gate_up = h.chunk(2, 1);
  return at::silu(gate_up[0]) * gate_up[1];
}

// Under dynamic-shape tracing (torch.compile, AOT autograd) sizes are symbolic: the composite
// then sticks to size-free ATen calls and specialises the two small integers it needs (k, E),
// and the eager argument checks are left to the fake kernels.
bool has_symbolic_sizes(const Tensor& t) {
  return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

int64_t concrete(const c10::SymInt& v) { return v.guard_int(__FILE__, __LINE__); }

// moe_ffn_routed from differentiable ops; rows of dropped slots come out of grouped_gemm as zeros
// and, with their weights zeroed too (a NaN weight times a zero row is NaN), add nothing and
// receive no gradient, as in the fused kernels.
Tensor moe_ffn_routed_composite(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                                const Tensor& w13, const Tensor& w2, const OptTensor& shared_w13,
                                const OptTensor& shared_w2) {
  const int64_t top_k = concrete(topk_ids.sym_size(1));
  auto [sorted, slot_to_row, offs] = call_moe_align(topk_ids, concrete(w13.sym_size(0)));
  const Tensor slot = sorted.to(at::kLong);                                 // [N]
  const Tensor token = slot.div(top_k, "floor");                            // [N]
  const Tensor h = call_grouped_gemm(x.index_select(0, token), w13, offs);  // [N, 2I]
  const Tensor expert_out = call_grouped_gemm(swiglu(h), w2, offs);         // [N, H]
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // moe_align drops ids outside [0, E) (only -1 gets here unchecked), so their weights count not.
  const Tensor dropped = topk_ids.lt(0).logical_or_(topk_ids.ge(w13.sym_size(0)));
  const Tensor slot_weight =
      topk_weights.masked_fill(dropped, 0).reshape({-1}).index_select(0, slot).to(acc);  // [N]
  Tensor y = at::zeros_like(x, x.options().dtype(acc))
                 .index_add(0, token, expert_out.to(acc) * slot_weight.unsqueeze(1));  // [T, H]
  if (shared_w13.has_value()) y = y + at::mm(swiglu(at::mm(x, shared_w13->t())), shared_w2->t());
  return y.to(x.scalar_type());
}

Tensor moe_ffn_routed_autograd(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                               const Tensor& w13, const Tensor& w2, const OptTensor& shared_w13,
                               const OptTensor& shared_w2) {
  if (!requires_grad({&x, &topk_weights, &w13, &w2}, {&shared_w13, &shared_w2})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<RoutedSig>("pearlmoe::moe_ffn_routed");
    return op.call(x, topk_weights, topk_ids, w13, w2, shared_w13, shared_w2);
  }
  if (!has_symbolic_sizes(x)) {
    check_moe_ffn_routed_args(x, topk_weights, topk_ids, w13, w2, shared_w13, shared_w2);
  }
  return moe_ffn_routed_composite(x, topk_weights, topk_ids, w13, w2, shared_w13, shared_w2);
}

Tensor moe_ffn_autograd(const Tensor& x, const Tensor& router_w, const Tensor& w13,
                        const Tensor& w2, int64_t top_k, const OptTensor& shared_w13,
                        const OptTensor& shared_w2, bool renormalize) {
  if (!requires_grad({&x, &router_w, &w13, &w2}, {&shared_w13, &shared_w2})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<MoeSig>("pearlmoe::moe_ffn");
    return op.call(x, router_w, w13, w2, top_k, shared_w13, shared_w2, renormalize);
  }
  if (!has_symbolic_sizes(x))
    check_moe_ffn_args(x, router_w, w13, w2, top_k, shared_w13, shared_w2);
  const Tensor logits = at::mm(x.to(at::kFloat), router_w.to(at::kFloat).t());  // [T, E]
  auto [weights, ids] = call_topk_softmax(logits, top_k, renormalize);
  return moe_ffn_routed_composite(x, weights, ids, w13, w2, shared_w13, shared_w2);
}

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, Autograd, m) {
  m.impl("topk_softmax", &topk_softmax_autograd);
  m.impl("grouped_gemm", &grouped_gemm_autograd);
  m.impl("moe_ffn_routed", &moe_ffn_routed_autograd);
  m.impl("moe_ffn", &moe_ffn_autograd);
}

}  // namespace pearlmoe
