// Torch-free CPU attention for a few query rows (decode, verification): one GQA group of query
// heads at one query position against its KV head's keys. The scores are a skinny GEMM (the
// group's rows against the key rows, read once), the softmax and the P·V product are AVX-512
// loops, all in fp32. Each query row is computed on its own in a fixed order, so a row's output
// does not depend on how many other rows the call has: a decode step and a verification window
// agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "../moe_gemm/skinny_gemm_cpu.h"
#include "../simd_x86.h"

namespace pearlmoe::attention_cpu {

#if defined(PM_X86_SIMD)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
namespace detail {

using simd::exp_ps;
using simd::load_ps;
using simd::tail;

// scores [group, keys] (scaled here) -> softmax in place, then o[g] = Σ_j p[g, j] v[j] / l[g].
template <typename T>
void softmax_pv(float* scores, int group, int64_t keys, float scale, const T* v, int64_t v_stride,
                int dim, float* acc, T* o, int64_t o_stride) {
  float inv_sum[16];
  for (int g = 0; g < group; ++g) {
    float* row = scores + g * keys;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < keys; j += 16) {
      const __mmask16 m = tail(keys - j);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, row + j));
    }
    const float shift = _mm512_reduce_max_ps(vmax) * scale;
    const __m512 vscale = _mm512_set1_ps(scale), vshift = _mm512_set1_ps(shift);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; j += 16) {
      const __mmask16 m = tail(keys - j);
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, row + j), vscale, vshift);
      const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(x));
      _mm512_mask_storeu_ps(row + j, m, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    inv_sum[g % 16] = 1.f / _mm512_reduce_add_ps(vsum);
    float* a = acc + g * dim;
    for (int d = 0; d < dim; d += 16)
      _mm512_mask_storeu_ps(a + d, tail(dim - d), _mm512_setzero_ps());
    if (g % 16 != 15 && g + 1 != group) continue;
    // P·V for this block of up to 16 rows: each V row read once for all of them.
    const int g0 = g - g % 16;
    for (int64_t j = 0; j < keys; ++j) {
      const T* vj = v + j * v_stride;
      for (int d = 0; d < dim; d += 16) {
        const __mmask16 m = tail(dim - d);
        const __m512 vv = load_ps(vj + d, m);
        for (int r = g0; r <= g; ++r) {
          float* ar = acc + r * dim + d;
          const __m512 p = _mm512_set1_ps(scores[r * keys + j]);
          _mm512_mask_storeu_ps(ar, m, _mm512_fmadd_ps(p, vv, _mm512_maskz_loadu_ps(m, ar)));
        }
      }
    }
    for (int r = g0; r <= g; ++r) {
      const float* ar = acc + r * dim;
      T* out = o + r * o_stride;
      for (int d = 0; d < dim; ++d) moe_gemm::store(out + d, ar[d] * inv_sum[r % 16]);
    }
  }
}

}  // namespace detail
#pragma GCC pop_options
#endif  // PM_X86_SIMD

// For one query position and KV head: the group's query rows q [group, dim] (row stride q_stride,
// contiguous head dim) attend to keys 0..keys-1 of k/v (row stride kv_stride): o[g] =
// softmax(scale · q[g]·K^T) · V, into o (row stride o_stride). scratch holds group·(keys + dim)
// floats. T is float or BF16. Returns false (nothing written) where this CPU has no AVX-512: the
// caller's portable loop runs.
template <typename T>
bool attend_group(const T* q, int64_t q_stride, int group, int dim, const T* k, const T* v,
                  int64_t kv_stride, int64_t keys, float scale, float* scratch, T* o,
                  int64_t o_stride) {
#if defined(PM_X86_SIMD)
  if (moe_gemm::cpu_isa() == moe_gemm::CpuIsa::kGeneric || keys <= 0) return false;
  float* scores = scratch;  // [group, keys]
  moe_gemm::skinny_gemm_nt_ld(q, q_stride, group, dim, k, kv_stride, 0, keys, scores, keys);
  detail::softmax_pv(scores, group, keys, scale, v, kv_stride, dim, scratch + group * keys, o,
                     o_stride);
  return true;
#else
  (void)q, (void)q_stride, (void)group, (void)dim, (void)k, (void)v, (void)kv_stride, (void)keys;
  (void)scale, (void)scratch, (void)o, (void)o_stride;
  return false;
#endif
}

}  // namespace pearlmoe::attention_cpu
