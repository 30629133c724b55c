// CPU attention kernels: a blocked online-softmax attention on BLAS matmuls, and RoPE + RMSNorm.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace pearlmoe::cpu {
namespace {

using at::Tensor;

constexpr int64_t kQueryBlock = 64;  // query rows per task (times the GQA group)

// Keys per online-softmax step: about 32K scores per step, so decode (few rows) takes long key
// blocks and pays the per-step op overhead rarely, while prefill keeps its scores in cache.
int64_t key_block(int64_t score_rows) { return std::clamp<int64_t>(32768 / score_rows, 256, 4096); }

}  // namespace

void attention(const Tensor& q, const Tensor& k, const Tensor& v, const int32_t* kv_lens,
               double scale, Tensor& o) {
  const int64_t batch = q.size(0), q_len = q.size(1), q_heads = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(2), group = q_heads / kv_heads;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t q_blocks = (q_len + kQueryBlock - 1) / kQueryBlock;

  // One task = (sequence, KV head, query block): the group's query heads share each K/V block.
  at::parallel_for(0, batch * kv_heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
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
        // Every row sees key 0, so m is finite after the first block and exp() never sees inf-inf.
        const Tensor m_new = at::maximum(m, std::get<0>(s.max(1, /*keepdim=*/true)));
        const Tensor p = (s - m_new).exp_();
        const Tensor correction = (m - m_new).exp_();
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

void rope_norm(const Tensor& x, const int64_t* positions, const float* weight,
               const float* inv_freq, double eps, bool normalize, Tensor& out) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_norm_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t ts = x.stride(0), hs = x.stride(1);
    at::parallel_for(0, tokens * heads, 256, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> r(dim);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row / heads, h = row % heads;
        const scalar_t* xr = src + t * ts + h * hs;
        const float pos = static_cast<float>(positions[t]);
        acc_t sum_sq = 0;
        for (int64_t i = 0; i < half; ++i) {
          const float angle = pos * inv_freq[i];  // fp32, as HF's tables hold it
          const acc_t c = std::cos(angle), s = std::sin(angle);
          const acc_t a = static_cast<acc_t>(xr[i]), b = static_cast<acc_t>(xr[i + half]);
          r[i] = a * c - b * s;
          r[i + half] = b * c + a * s;
          sum_sq += r[i] * r[i] + r[i + half] * r[i + half];
        }
        const acc_t inv_rms = normalize ? 1 / std::sqrt(sum_sq / dim + static_cast<acc_t>(eps)) : 1;
        for (int64_t i = 0; i < dim; ++i) {
          const acc_t w = weight != nullptr ? weight[i] : 1;
          dst[row * dim + i] = static_cast<scalar_t>(r[i] * inv_rms * w);
        }
      }
    });
  });
}

}  // namespace pearlmoe::cpu
