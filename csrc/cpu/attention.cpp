// CPU attention kernels: a blocked online-softmax attention on BLAS matmuls, and RoPE + RMSNorm.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "../kernels/attention/attention_rows_cpu.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace pearlmoe::cpu {
namespace {

using at::Tensor;

constexpr int64_t kQueryBlock = 64;  // query rows per task (times the GQA group)

// Keys per online-softmax step: about 32K scores per step, so decode (few rows) takes long key
// blocks and pays the per-step op overhead rarely, while prefill keeps its scores in cache.
int64_t key_block(int64_t score_rows) { return std::clamp<int64_t>(32768 / score_rows, 256, 4096); }

// Decode and verification (a few query rows): one (sequence, query row, KV head) per task, the
// GQA group's query heads together so each K and V row is read once for all of them, scores in a
// local buffer, loops the compiler vectorises (8 partial sums per dot product). The blocked path
// below spends ~20 ATen calls per task, ~100 us at these sizes (bench/NOTES.md has the numbers).
// Every call of up to 16 query rows takes it, whatever the group size and context: each row is
// computed on its own (an exact softmax over its keys), so a token's output is the same in a
// decode step and in a verification window of up to 16 tokens, which keeps greedy speculative
// decoding equal to autoregressive decoding bit for bit.
constexpr int64_t kDirectMaxQueries = 16;
// A short prompt's prefill takes it too while the call has at most this many query-key pairs:
// there its ~20 ATen calls per task cost more than the arithmetic (a 63-token prompt, 4 query
// heads on 2 KV heads, bf16, 2 threads: 226-240 us blocked, 65-100 us direct; even at 256
// tokens; blocked is faster from 512; bench/NOTES.md).
constexpr int64_t kDirectMaxPairs = int64_t{1} << 16;

template <typename acc_t, typename scalar_t>
acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  acc_t part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int u = 0; u < 8; ++u) part[u] += a[d + u] * static_cast<acc_t>(b[d + u]);
  acc_t sum =
      ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < n; ++d) sum += a[d] * static_cast<acc_t>(b[d]);
  return sum;
}

// Query positions per task of the AVX-512 path: a decode step's or verification window's rows
// (up to kDirectMaxQueries) in one task per KV head, a short prompt's in blocks of this many;
// fewer where the block's scores would pass kWindowScores floats (a long context), which keeps
// them in cache and gives the threads more tasks. A row's output does not depend on its block.
constexpr int64_t kWindowPositions = 16;
constexpr int64_t kWindowScores = int64_t{1} << 16;  // 256 KB of fp32 scores

template <typename scalar_t>
void attention_direct(const Tensor& q, const Tensor& k, const Tensor& v, const int32_t* kv_lens,
                      int64_t longest, double scale, Tensor& o) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t batch = q.size(0), q_len = q.size(1), dim = q.size(3);
  const int64_t kv_heads = k.size(2), group = q.size(2) / kv_heads;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = o.mutable_data_ptr<scalar_t>();
  const int64_t rows = batch * q_len * kv_heads;  // (sequence, position, KV head) units
  // Inline (no thread pool) while the whole call is a few hundred thousand multiply-adds, or
  // from 2^15 when there are at least 4 units: a verification window's rows (2 per KV head and
  // token) then split over the threads, which the decode step's serial attention left idle
  // (9-token window of the embedded target, 64-150 keys, paired A/B: 0.92-0.99x the time; a
  // one-token step's 2 units stay inline, where the fork costs what it saves).
  const int64_t macs = rows * group * longest * dim;
  const bool inline_call = macs < (1 << 18) && (rows < 4 || macs < (1 << 15));

  // The portable loop for query position i of sequence b against KV head hk.
  auto portable = [&](int64_t b, int64_t i, int64_t hk, std::vector<acc_t>& qv,
                      std::vector<acc_t>& out, std::vector<acc_t>& p, std::vector<acc_t>& m,
                      std::vector<acc_t>& l) {
    const int64_t keys = kv_lens[b] - q_len + i + 1;  // bottom-right causal
    for (int64_t g = 0; g < group; ++g) {
      const scalar_t* qr = qp + b * q.stride(0) + i * q.stride(1) + (hk * group + g) * q.stride(2);
      for (int64_t d = 0; d < dim; ++d)
        qv[g * dim + d] = static_cast<acc_t>(qr[d * q.stride(3)]) * static_cast<acc_t>(scale);
    }
    const scalar_t* kr = kp + b * k.stride(0) + hk * k.stride(2);
    const scalar_t* vr = vp + b * v.stride(0) + hk * v.stride(2);
    std::fill(m.begin(), m.end(), -INFINITY);
    for (int64_t j = 0; j < keys; ++j) {
      const scalar_t* kj = kr + j * k.stride(1);
      for (int64_t g = 0; g < group; ++g) {
        const acc_t s = dot(&qv[g * dim], kj, dim);
        p[g * longest + j] = s;
        m[g] = std::max(m[g], s);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      acc_t sum = 0;
      acc_t* pg = &p[g * longest];
      for (int64_t j = 0; j < keys; ++j) sum += (pg[j] = std::exp(pg[j] - m[g]));
      l[g] = sum;
    }
    std::fill(out.begin(), out.end(), acc_t(0));
    for (int64_t j = 0; j < keys; ++j) {
      const scalar_t* vj = vr + j * v.stride(1);
      for (int64_t g = 0; g < group; ++g) {
        const acc_t pj = p[g * longest + j];
        acc_t* og = &out[g * dim];
        for (int64_t d = 0; d < dim; ++d) og[d] += pj * static_cast<acc_t>(vj[d]);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      scalar_t* orow = op + b * o.stride(0) + i * o.stride(1) + (hk * group + g) * o.stride(2);
      for (int64_t d = 0; d < dim; ++d)
        orow[d * o.stride(3)] = static_cast<scalar_t>(out[g * dim + d] / l[g]);
    }
  };

  // The AVX-512 window kernel (attention_rows_cpu.h) for fp32 and bf16 with contiguous head dims:
  // one task per (sequence, KV head, block of positions), the block's rows scored in one GEMM
  // over the keys and their P·V held in registers.
  using Simd = std::conditional_t<
      std::is_same_v<scalar_t, float>, float,
      std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, moe_gemm::BF16, void>>;
  const bool simd = !std::is_void_v<Simd> && q.stride(3) == 1 && k.stride(3) == 1 &&
                    v.stride(3) == 1 && k.stride(1) == v.stride(1) && o.stride(3) == 1 &&
                    moe_gemm::cpu_isa() != moe_gemm::CpuIsa::kGeneric;
  if constexpr (!std::is_void_v<Simd>) {
    if (simd) {
      const int64_t per_block =
          std::clamp<int64_t>(kWindowScores / (group * longest), 1, kWindowPositions);
      const int64_t blocks = (q_len + per_block - 1) / per_block;
      const int64_t tasks = batch * kv_heads * blocks;
      const int64_t block_rows = std::min(q_len, per_block) * group;
      cpu::parallel_for(0, tasks, inline_call ? tasks : 1, [&](int64_t begin, int64_t end) {
        // Uninitialised: a task writes every score and row it reads.
        const auto q_rows = std::make_unique_for_overwrite<Simd[]>(block_rows * dim);
        const auto scratch = std::make_unique_for_overwrite<float[]>(
            attention_cpu::window_scratch(block_rows, longest));
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / (kv_heads * blocks), hk = task / blocks % kv_heads;
          const int64_t p0 = task % blocks * per_block;
          const int64_t n = std::min(per_block, q_len - p0);
          const int64_t first_keys = kv_lens[b] - q_len + p0 + 1;  // >= 1: the op checks lens
          const auto* qr = reinterpret_cast<const Simd*>(qp + b * q.stride(0) + p0 * q.stride(1) +
                                                         hk * group * q.stride(2));
          const auto* kr = reinterpret_cast<const Simd*>(kp + b * k.stride(0) + hk * k.stride(2));
          const auto* vr = reinterpret_cast<const Simd*>(vp + b * v.stride(0) + hk * v.stride(2));
          auto* orow = reinterpret_cast<Simd*>(op + b * o.stride(0) + p0 * o.stride(1) +
                                               hk * group * o.stride(2));
          const bool done = attention_cpu::attend_window(
              qr, q.stride(1), q.stride(2), static_cast<int>(n), static_cast<int>(group),
              static_cast<int>(dim), kr, vr, k.stride(1), first_keys, static_cast<float>(scale),
              q_rows.get(), scratch.get(), orow, o.stride(1), o.stride(2));
          TORCH_INTERNAL_ASSERT(done, "attention_cpu: a window row with no key");
        }
      });
      return;
    }
  }
  cpu::parallel_for(0, rows, inline_call ? rows : 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qv(group * dim), out(group * dim), p(group * longest), m(group), l(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (q_len * kv_heads), i = task / kv_heads % q_len;
      portable(b, i, task % kv_heads, qv, out, p, m, l);
    }
  });
}

}  // namespace

bool attention_rows_alone(int64_t batch, int64_t q_len, int64_t longest) {
  return q_len <= kDirectMaxQueries || batch * q_len * longest <= kDirectMaxPairs;
}

void attention(const Tensor& q, const Tensor& k, const Tensor& v, const int32_t* kv_lens,
               double scale, Tensor& o) {
  const int64_t batch = q.size(0), q_len = q.size(1), q_heads = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(2), group = q_heads / kv_heads;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max<int64_t>(longest, kv_lens[b]);
  if (attention_rows_alone(batch, q_len, longest)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, q.scalar_type(), "attention_cpu",
        [&] { attention_direct<scalar_t>(q, k, v, kv_lens, longest, scale, o); });
    return;
  }
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t q_blocks = (q_len + kQueryBlock - 1) / kQueryBlock;

  // One task = (sequence, KV head, query block): the group's query heads share each K/V block.
  cpu::parallel_for(0, batch * kv_heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (kv_heads * q_blocks), hk = task / q_blocks % kv_heads;
      const int64_t i0 = task % q_blocks * kQueryBlock, rows = std::min(kQueryBlock, q_len - i0);
      const int64_t kv_len = kv_lens[b];
      // Query row i (absolute key position kv_len - q_len + i) sees keys j < limit(i).
      const Tensor limit =
          at::arange(kv_len - q_len + i0 + 1, kv_len - q_len + i0 + rows + 1, at::kLong)
              .repeat({group})
              .unsqueeze(1);  // [G*rows, 1]
      const Tensor qb = q[b].narrow(0, i0, rows)
                            .narrow(1, hk * group, group)
                            .transpose(0, 1)
                            .reshape({group * rows, dim})
                            .to(acc)
                            .mul(scale);  // [G*rows, D] (a copy: q may be viewed)
      Tensor m = at::full({group * rows, 1}, -INFINITY, qb.options());  // running max
      Tensor l = at::zeros({group * rows, 1}, qb.options());            // running sum
      Tensor out = at::zeros({group * rows, dim}, qb.options());        // running P·V
      const int64_t keys = kv_len - q_len + i0 + rows;  // the block's last row sees this many
      const int64_t block = key_block(group * rows);
      for (int64_t j0 = 0; j0 < keys; j0 += block) {
        const int64_t n = std::min(block, keys - j0);
        const Tensor kb = k[b].narrow(0, j0, n).select(1, hk).to(acc);  // [n, D]
        const Tensor vb = v[b].narrow(0, j0, n).select(1, hk).to(acc);  // [n, D]
        Tensor s = at::mm(qb, kb.t());                                  // [G*rows, n]
        if (j0 + n > kv_len - q_len + i0 + 1) {  // the block reaches past the first row's limit
          const Tensor key = at::arange(j0, j0 + n, at::kLong).unsqueeze(0);  // [1, n]
          s.masked_fill_(key >= limit, -INFINITY);
        }
        // A row whose keys so far all score -inf (overflowing q·k) keeps m = -inf: shift it by 0
        // instead, so exp() gives 0 rather than exp(-inf + inf) = NaN (the CUDA kernels' rule).
        const Tensor m_new = at::maximum(m, std::get<0>(s.max(1, /*keepdim=*/true)));
        const Tensor m_use = at::where(m_new.isneginf(), at::zeros_like(m_new), m_new);
        const Tensor p = (s - m_use).exp_();
        const Tensor correction = (m - m_use).exp_();
        l.mul_(correction).add_(p.sum(1, /*keepdim=*/true));
        out.mul_(correction).addmm_(p, vb);
        m = m_new;
      }
      out.div_(l);
      o[b].narrow(0, i0, rows)
          .narrow(1, hk * group, group)
          .copy_(out.view({group, rows, dim}).transpose(0, 1));
    }
  });
}

void rope_cos_sin(const int64_t* positions, int64_t tokens, const float* inv_freq, int64_t dim,
                  float* cos_sin) {
  const int64_t half = dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float pos = static_cast<float>(positions[t]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];  // fp32, as HF's tables hold it
      cos_sin[t * dim + i] = std::cos(angle);
      cos_sin[t * dim + half + i] = std::sin(angle);
    }
  }
}

void rope_norm(const Tensor& x, const int64_t* positions, const Tensor& q_weight,
               const Tensor& k_weight, const float* inv_freq, double eps, bool normalize,
               Tensor& out, const float* cos_sin) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_norm_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t ts = x.stride(0), hs = x.stride(1);
    // The folded weight q_w ⊙ k_w, each converted to acc_t first (what the reference computes).
    std::vector<acc_t> w;
    for (const Tensor* t : {&q_weight, &k_weight}) {
      if (!t->defined()) continue;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t->scalar_type(), "rope_w", [&] {
        const scalar_t* p = t->const_data_ptr<scalar_t>();
        if (w.empty()) {
          w.assign(dim, acc_t(1));
        }
        for (int64_t i = 0; i < dim; ++i) w[i] *= static_cast<acc_t>(p[i]);
      });
    }
    // The caller's table where it has one (fp32 angles' cos/sin: not for fp64, which rotates in
    // fp64).
    const float* table = std::is_same_v<acc_t, float> ? cos_sin : nullptr;
    // One task per token: its angles' cos/sin once, for every head.
    cpu::parallel_for(
        0, tokens, std::max<int64_t>(1, 256 / heads), [&](int64_t begin, int64_t end) {
          std::vector<acc_t> r(dim), cs(half), sn(half);
          for (int64_t t = begin; t < end; ++t) {
            if (table != nullptr) {
              std::copy_n(table + t * dim, half, cs.begin());
              std::copy_n(table + t * dim + half, half, sn.begin());
            } else {
              const float pos = static_cast<float>(positions[t]);
              for (int64_t i = 0; i < half; ++i) {
                const float angle = pos * inv_freq[i];  // fp32, as HF's tables hold it
                // fp64 rotates in fp64 (the reference does), from the same fp32 angle.
                cs[i] = std::cos(static_cast<acc_t>(angle));
                sn[i] = std::sin(static_cast<acc_t>(angle));
              }
            }
            for (int64_t h = 0; h < heads; ++h) {
              const scalar_t* xr = src + t * ts + h * hs;
              acc_t sum_sq = 0;
              for (int64_t i = 0; i < half; ++i) {
                const acc_t a = static_cast<acc_t>(xr[i]), b = static_cast<acc_t>(xr[i + half]);
                r[i] = a * cs[i] - b * sn[i];
                r[i + half] = b * cs[i] + a * sn[i];
                sum_sq += r[i] * r[i] + r[i + half] * r[i + half];
              }
              const acc_t inv_rms =
                  normalize ? 1 / std::sqrt(sum_sq / dim + static_cast<acc_t>(eps)) : acc_t(1);
              scalar_t* o = dst + (t * heads + h) * dim;
              for (int64_t i = 0; i < dim; ++i) {
                o[i] = static_cast<scalar_t>(w.empty() ? r[i] * inv_rms : r[i] * inv_rms * w[i]);
              }
            }
          }
        });
  });
}

}  // namespace pearlmoe::cpu
