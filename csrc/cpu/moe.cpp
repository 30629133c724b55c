// CPU kernels of the expert FFN: per-group BLAS matmuls, run in parallel over groups when the
// groups are small (decode) and one after another with multi-threaded BLAS when they are large.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels/moe_gemm/silu_mul_cpu.h"
#include "../kernels/moe_gemm/skinny_gemm_cpu.h"
#include "../kernels/routing/routing_cpu.h"
#include "cpu_kernels.h"
#include "parallel.h"

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
    cpu::parallel_for(0, num_groups, 1, run);
  } else {
    run(0, num_groups);
  }
}

}  // namespace

// Work (multiply-adds) from which a call's independent parts go to the thread pool.
constexpr int64_t kThreadedMacs = int64_t{1} << 18;

bool gemm_rows_alone(int64_t rows, at::ScalarType dtype) {
  return rows <= moe_gemm::kSkinnyMaxRows && (dtype == at::kFloat || dtype == at::kBFloat16);
}

void gemm_nt_out(const Tensor& a, const Tensor& b, Tensor& out) {
  const auto dtype = a.scalar_type();
  const bool skinny = a.size(0) > 0 && gemm_rows_alone(a.size(0), dtype) && a.stride(1) == 1 &&
                      b.is_contiguous() && out.is_contiguous();
  if (!skinny) {
    if (in_pool_scope()) pool_rest();  // BLAS's OpenMP team needs the cores the helpers spin on
    at::mm_out(out, a, b.t());
    return;
  }
  const int64_t rows = a.size(0), k = a.size(1), n = b.size(0);
  // Columns split across threads once a call has kThreadedMacs of work (a verification window's
  // projections; a 1-token step's stay inline, where a fork/join costs more than it saves). The
  // split falls on 4-column blocks, so each thread streams whole blocks (a column's sum is the
  // same in a block or alone: skinny_gemm_x86.h's reduce4).
  const int64_t blocks = (n + 3) / 4;
  const int64_t grain = rows * n * k >= kThreadedMacs ? 16 : blocks;
  cpu::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    const int64_t begin = 4 * first, end = std::min(4 * last, n);
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

const char* skinny_isa() { return moe_gemm::isa_name(moe_gemm::cpu_isa()); }

// out = silu(gate) * up in their dtype, as the reference and the eager step compute it (silu
// rounded, then the product), by rows on cpu::parallel_for: inside a fused step the pool, where
// one ATen call over a prefill's rows was an OpenMP region whose new team thread waited for a
// core beside the pool's spinning helper (speculative decoding at batch 4, the draft's prefill:
// 0.8x). gate and up are column halves (strided), so ATen loops row by row either way: the same
// bits.
void silu_mul_out(const Tensor& gate, const Tensor& up, Tensor& out) {
  const int64_t grain =
      std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(gate.size(1), 1));
  parallel_for(0, gate.size(0), grain, [&](int64_t r0, int64_t r1) {
    Tensor o = out.narrow(0, r0, r1 - r0);
    at::silu_out(o, gate.narrow(0, r0, r1 - r0));
    o.mul_(up.narrow(0, r0, r1 - r0));
  });
}

namespace {

Tensor gemm_nt(const Tensor& a, const Tensor& b) {
  Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  gemm_nt_out(a, b, out);
  return out;
}

// out = silu(h[:, :I]) * h[:, I:].
void silu_and_mul(const Tensor& h, Tensor out) {
  const int64_t inter = h.size(1) / 2;
  silu_mul_out(h.narrow(1, 0, inter), h.narrow(1, inter, inter), out);
}

// Decode- and verification-sized calls (up to kSkinnyMaxRows tokens of a small model): the
// token-slots grouped by expert, then per used expert one skinny GEMM pair over all of its rows
// (its weights are read once per call, however many of the tokens chose it), and the shared
// expert over all rows at once (as parallel tasks when a prefill brings enough work; a decode
// step runs inline). The general path below spends ~25 ATen
// calls (~75 us) before its arithmetic at these sizes. Same math and rounding points: GEMM outputs
// and SiLU·up in the input dtype, the combine in fp32. Which path a call takes depends on the
// token count only through kSmallTokens (= kSkinnyMaxRows), never on a total that grows with the
// batch below it, so a token's result is the same in a 1-token step and in a server's batch.
constexpr int64_t kSmallTokens = moe_gemm::kSkinnyMaxRows;
constexpr int64_t kSmallMacsPerToken = 1 << 20;  // larger experts: the general path, any T

template <typename T>
void moe_ffn_small(const Tensor& x, const float* weights, const int64_t* ids, int64_t top_k,
                   const Tensor& w13, const Tensor& w2, const std::optional<Tensor>& shared_w13,
                   const std::optional<Tensor>& shared_w2, Tensor& y) {
  using moe_gemm::skinny_gemm_nt;
  using moe_gemm::store;
  using moe_gemm::to_float;
  const int64_t tokens = x.size(0), hidden = x.size(1), inter = w2.size(2);
  const int64_t num_experts = w13.size(0);
  const int64_t shared = shared_w2.has_value() ? shared_w2->size(1) : 0;
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const T* w13p = static_cast<const T*>(w13.const_data_ptr());
  const T* w2p = static_cast<const T*>(w2.const_data_ptr());

  // Slots by expert, in slot order within an expert (-1: a dropped slot); an expert can hold
  // every slot (routing given by the caller may repeat an expert per token).
  const int64_t slots = tokens * top_k;
  std::vector<std::vector<int64_t>> order(num_experts);
  for (int64_t s = 0; s < slots; ++s) {
    if (ids[s] >= 0) order[ids[s]].push_back(s);
  }
  std::vector<int64_t> used, first(num_experts + 1, 0);  // used experts; their rows in `out`
  for (int64_t e = 0; e < num_experts; ++e) {
    if (!order[e].empty()) used.push_back(e);
    first[e + 1] = first[e] + static_cast<int64_t>(order[e].size());
  }
  // Every expert's output rows, then the shared expert's (row-major, `hidden` wide).
  std::vector<T> out((first[num_experts] + (shared ? tokens : 0)) * hidden);

  // SwiGLU over n rows (row stride hidden) into dst: w2 · (silu(w13[:I] x) * (w13[I:] x)).
  auto expert = [&](const T* xr, int64_t n, const T* gate_up, const T* down, int64_t width,
                    T* dst) {
    std::vector<T> h(n * 2 * width), act(n * width);
    skinny_gemm_nt(xr, hidden, n, hidden, gate_up, 0, 2 * width, h.data(), 2 * width);
    moe_gemm::silu_mul(h.data(), n, width, act.data());
    skinny_gemm_nt(act.data(), width, n, width, down, 0, hidden, dst, hidden);
  };
  // One task per used expert (its tokens gathered, its weights read once) and one for the shared
  // expert; each row is computed on its own, so splitting the work changes no result. Threads
  // only where there is enough of it (a prefill; a decode step runs inline).
  const int64_t tasks = static_cast<int64_t>(used.size()) + (shared ? 1 : 0);
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t == static_cast<int64_t>(used.size())) {
        expert(xp, tokens, static_cast<const T*>(shared_w13->const_data_ptr()),
               static_cast<const T*>(shared_w2->const_data_ptr()), shared,
               out.data() + first[num_experts] * hidden);
        continue;
      }
      const int64_t e = used[t], n = static_cast<int64_t>(order[e].size());
      std::vector<T> rows(n * hidden);
      for (int64_t r = 0; r < n; ++r) {
        std::copy_n(xp + (order[e][r] / top_k) * hidden, hidden, rows.data() + r * hidden);
      }
      expert(rows.data(), n, w13p + e * 2 * inter * hidden, w2p + e * hidden * inter, inter,
             out.data() + first[e] * hidden);
    }
  };
  const int64_t macs = (slots * inter + tokens * shared) * 3 * hidden;
  if (macs >= kThreadedMacs && tasks > 1) {
    cpu::parallel_for(0, tasks, 1, run);
  } else {
    run(0, tasks);
  }

  // The combine in a fixed order: the shared expert, then the experts in id order.
  std::vector<float> acc(tokens * hidden, 0.f);
  if (shared) {
    const T* src = out.data() + first[num_experts] * hidden;
    for (int64_t i = 0; i < tokens * hidden; ++i) acc[i] = to_float(src[i]);
  }
  for (const int64_t e : used) {
    for (int64_t r = 0; r < static_cast<int64_t>(order[e].size()); ++r) {
      const int64_t slot = order[e][r];
      const float w = weights[slot];
      float* dst = acc.data() + (slot / top_k) * hidden;
      const T* src = out.data() + (first[e] + r) * hidden;
      for (int64_t d = 0; d < hidden; ++d) dst[d] += to_float(src[d]) * w;
    }
  }
  T* yp = static_cast<T*>(y.mutable_data_ptr());
  for (int64_t i = 0; i < tokens * hidden; ++i) store(&yp[i], acc[i]);
}

// Whether a call takes moe_ffn_small: fp32 or bf16, contiguous, at most kSmallTokens tokens of
// experts small enough (the router's own conditions are the caller's).
bool takes_small_path(const Tensor& x, int64_t top_k, const Tensor& w13, const Tensor& w2,
                      const std::optional<Tensor>& shared_w13,
                      const std::optional<Tensor>& shared_w2) {
  const int64_t tokens = x.size(0), hidden = x.size(1), inter = w2.size(2);
  const int64_t shared = shared_w2.has_value() ? shared_w2->size(1) : 0;
  const int64_t macs = (top_k * inter + shared) * 3 * hidden;  // per token
  const auto dtype = x.scalar_type();
  return tokens > 0 && tokens <= kSmallTokens && macs <= kSmallMacsPerToken &&
         (dtype == at::kFloat || dtype == at::kBFloat16) && x.is_contiguous() &&
         w13.is_contiguous() && w2.is_contiguous() &&
         (!shared || (shared_w13->is_contiguous() && shared_w2->is_contiguous()));
}

// moe_ffn_small in x's dtype, into a new y.
Tensor run_small(const Tensor& x, const float* weights, const int64_t* ids, int64_t top_k,
                 const Tensor& w13, const Tensor& w2, const std::optional<Tensor>& shared_w13,
                 const std::optional<Tensor>& shared_w2) {
  Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    moe_ffn_small<float>(x, weights, ids, top_k, w13, w2, shared_w13, shared_w2, y);
  } else {
    moe_ffn_small<moe_gemm::BF16>(x, weights, ids, top_k, w13, w2, shared_w13, shared_w2, y);
  }
  return y;
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

bool moe_ffn_small_call(const Tensor& x, const Tensor& router_w, const Tensor& w13,
                        const Tensor& w2, int64_t top_k, const std::optional<Tensor>& shared_w13,
                        const std::optional<Tensor>& shared_w2, bool renormalize, Tensor& y) {
  if (!takes_small_path(x, top_k, w13, w2, shared_w13, shared_w2) ||
      router_w.scalar_type() != at::kFloat || !router_w.is_contiguous()) {
    return false;
  }
  const int64_t tokens = x.size(0), hidden = x.size(1), num_experts = w13.size(0);
  // Router logits in fp32 through the skinny kernel (each token's logits computed alike whatever
  // the other tokens), then softmax and top-k per token.
  std::vector<float> x32(tokens * hidden), logits(tokens * num_experts), weights(tokens * top_k);
  std::vector<int32_t> ids32(tokens * top_k);
  std::vector<int64_t> ids(tokens * top_k);
  if (x.scalar_type() == at::kFloat) {
    std::copy_n(x.const_data_ptr<float>(), tokens * hidden, x32.data());
  } else {
    const auto* xb = static_cast<const moe_gemm::BF16*>(x.const_data_ptr());
    for (int64_t i = 0; i < tokens * hidden; ++i) x32[i] = moe_gemm::to_float(xb[i]);
  }
  moe_gemm::skinny_gemm_nt(x32.data(), hidden, tokens, hidden, router_w.const_data_ptr<float>(), 0,
                           num_experts, logits.data(), num_experts);
  for (int64_t t = 0; t < tokens; ++t) {
    routing::topk_softmax_row(logits.data() + t * num_experts, static_cast<int>(num_experts),
                              static_cast<int>(top_k), renormalize, weights.data() + t * top_k,
                              ids32.data() + t * top_k);
  }
  std::copy(ids32.begin(), ids32.end(), ids.begin());
  y = run_small(x, weights.data(), ids.data(), top_k, w13, w2, shared_w13, shared_w2);
  return true;
}

Tensor moe_ffn_routed(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                      const Tensor& w13, const Tensor& w2, const std::optional<Tensor>& shared_w13,
                      const std::optional<Tensor>& shared_w2) {
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1);
  const int64_t num_experts = w13.size(0), inter = w2.size(2);
  const int64_t slots = tokens * top_k;

  if (takes_small_path(x, top_k, w13, w2, shared_w13, shared_w2)) {
    const Tensor weights = topk_weights.to(at::kFloat).contiguous();
    const Tensor ids = topk_ids.to(at::kLong).contiguous();
    return run_small(x, weights.const_data_ptr<float>(), ids.const_data_ptr<int64_t>(), top_k, w13,
                     w2, shared_w13, shared_w2);
  }

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
