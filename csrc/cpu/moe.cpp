// CPU kernels of the expert FFN: per-group BLAS matmuls, run in parallel over groups when the
// groups are small (decode) and one after another with multi-threaded BLAS when they are large.
#include <ATen/Parallel.h>

#include <vector>

#include "../kernels/moe_gemm/skinny_gemm_cpu.h"
#include "../kernels/routing/routing_cpu.h"
#include "cpu_kernels.h"

namespace pearlmoe::cpu {
namespace {

using at::Tensor;

// Calls fn(g, lo, hi) for every non-empty group.
template <typename Fn>
void for_each_group(const int32_t* offs, int64_t num_groups, Fn&& fn) {
  const int64_t rows = offs[num_groups];
  int64_t busy = 0;
  for (int64_t g = 0; g < num_groups; ++g) busy += offs[g + 1] > offs[g];
  // Small groups: BLAS cannot use the cores within one group, so give each core whole groups.
  const bool across_groups = busy > 1 && rows < 64 * busy;
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      if (offs[g + 1] > offs[g]) fn(g, offs[g], offs[g + 1]);
    }
  };
  if (across_groups) {
    at::parallel_for(0, num_groups, 1, run);
  } else {
    run(0, num_groups);
  }
}

// out [M, N] = a [M, K] · b [N, K]^T. A few rows against a large b (decode) stream b once through
// the skinny kernel, split over N across threads; everything else goes to BLAS.
void gemm_nt_out(const Tensor& a, const Tensor& b, Tensor& out) {
  const auto dtype = a.scalar_type();
  const bool skinny = a.size(0) <= moe_gemm::kSkinnyMaxRows && a.size(0) > 0 &&
                      (dtype == at::kFloat || dtype == at::kBFloat16) && a.stride(1) == 1 &&
                      b.is_contiguous() && out.is_contiguous();
  if (!skinny) {
    at::mm_out(out, a, b.t());
    return;
  }
  const int64_t rows = a.size(0), k = a.size(1), n = b.size(0);
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    if (dtype == at::kFloat) {
      moe_gemm::skinny_gemm_nt(a.const_data_ptr<float>(), a.stride(0), rows, k,
                               b.const_data_ptr<float>(), begin, end, out.mutable_data_ptr<float>(),
                               out.stride(0));
    } else {
      using moe_gemm::BF16;
      moe_gemm::skinny_gemm_nt(static_cast<const BF16*>(a.const_data_ptr()), a.stride(0), rows, k,
                               static_cast<const BF16*>(b.const_data_ptr()), begin, end,
                               static_cast<BF16*>(out.mutable_data_ptr()), out.stride(0));
    }
  });
}

Tensor gemm_nt(const Tensor& a, const Tensor& b) {
  Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  gemm_nt_out(a, b, out);
  return out;
}

// out = silu(h[:, :I]) * h[:, I:], computed in h's dtype as the reference does.
void silu_and_mul(const Tensor& h, Tensor out) {
  const int64_t inter = h.size(1) / 2;
  at::mul_out(out, at::silu(h.narrow(1, 0, inter)), h.narrow(1, inter, inter));
}

}  // namespace

void grouped_gemm(const Tensor& a, const Tensor& b, const int32_t* offs, Tensor& c) {
  const int64_t num_groups = b.size(0);
  for_each_group(offs, num_groups, [&](int64_t g, int64_t lo, int64_t hi) {
    Tensor out = c.narrow(0, lo, hi - lo);
    gemm_nt_out(a.narrow(0, lo, hi - lo), b[g], out);
  });
  if (offs[num_groups] < c.size(0))
    c.narrow(0, offs[num_groups], c.size(0) - offs[num_groups]).zero_();
}

void grouped_gemm_wgrad(const Tensor& grad_c, const Tensor& a, const int32_t* offs,
                        Tensor& grad_b) {
  const int64_t num_groups = grad_b.size(0);
  for (int64_t g = 0; g < num_groups; ++g) {
    if (offs[g + 1] == offs[g]) grad_b[g].zero_();
  }
  for_each_group(offs, num_groups, [&](int64_t g, int64_t lo, int64_t hi) {
    Tensor out = grad_b[g];
    at::mm_out(out, grad_c.narrow(0, lo, hi - lo).t(), a.narrow(0, lo, hi - lo));
  });
}

Tensor moe_ffn_routed(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                      const Tensor& w13, const Tensor& w2, const std::optional<Tensor>& shared_w13,
                      const std::optional<Tensor>& shared_w2) {
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1);
  const int64_t num_experts = w13.size(0), inter = w2.size(2);
  const int64_t slots = tokens * top_k;

  // Group the slots by expert (ids were range-checked by the caller).
  std::vector<int32_t> sorted(slots), slot_to_row(slots), offs(num_experts + 1),
      counts(num_experts + 1);
  AT_DISPATCH_INDEX_TYPES(topk_ids.scalar_type(), "moe_ffn_align", [&] {
    routing::moe_align(topk_ids.const_data_ptr<index_t>(), slots, static_cast<int>(num_experts),
                       sorted.data(), slot_to_row.data(), offs.data(), counts.data());
  });
  const int64_t routed = offs[num_experts];
  const Tensor rows = at::from_blob(sorted.data(), {routed}, at::kInt).to(at::kLong);  // [R]
  const Tensor tokens_of_rows = rows.div(top_k, "floor");                              // [R]

  // Per expert: gather its tokens, gate/up GEMM, SiLU·up, down GEMM; rows in expert order.
  Tensor expert_out = at::empty({routed, hidden}, x.options());  // [R, H]
  for_each_group(offs.data(), num_experts, [&](int64_t e, int64_t lo, int64_t hi) {
    const Tensor xe = x.index_select(0, tokens_of_rows.narrow(0, lo, hi - lo));  // [n, H]
    const Tensor h = gemm_nt(xe, w13[e]);                                        // [n, 2I]
    Tensor act = at::empty({hi - lo, inter}, x.options());                       // [n, I]
    silu_and_mul(h, act);
    Tensor out = expert_out.narrow(0, lo, hi - lo);
    gemm_nt_out(act, w2[e], out);
  });

  // Weighted combine in fp32 (fp64 for fp64 inputs), plus the shared expert.
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor y;  // [T, H]
  if (shared_w13.has_value()) {
    const Tensor hs = gemm_nt(x, *shared_w13);  // [T, 2Is]
    Tensor act = at::empty({tokens, hs.size(1) / 2}, x.options());
    silu_and_mul(hs, act);
    y = gemm_nt(act, *shared_w2).to(acc_type);
  } else {
    y = at::zeros({tokens, hidden}, x.options().dtype(acc_type));
  }
  const Tensor slot_weights =
      topk_weights.reshape({-1}).index_select(0, rows).to(acc_type).unsqueeze(1);  // [R, 1]
  y.index_add_(0, tokens_of_rows, expert_out.to(acc_type).mul_(slot_weights));
  return y.to(x.scalar_type());
}

}  // namespace pearlmoe::cpu
