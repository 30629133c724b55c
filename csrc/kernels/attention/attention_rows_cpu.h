// Torch-free CPU attention for a few query rows (decode, verification): the query positions of a
// window with their GQA group of query heads, against one KV head's keys. The scores are a skinny
// GEMM (all the rows against the key rows, read once), the softmax and the P·V product are
// AVX-512 loops, all in fp32. Each query row is computed on its own in a fixed order over its own
// keys, so a row's output does not depend on how many other rows the call has: a decode step and
// a verification window agree bit for bit.
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

// One row of scores over its keys (scaled here) -> exp(scale · (s - max)) in place; returns
// 1 / the row's sum.
inline float softmax_row(float* row, int64_t keys, float scale) {
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
  return 1.f / _mm512_reduce_add_ps(vsum);
}

// o[r] = Σ_{j < keys(r)} p[r, j] v[j] · inv_sum[r] for R (up to 4) rows of a window (p row stride
// p_stride), row r being row first_row + r of positions x group, which sees first_keys + its
// position keys: dims in slices of 64 held in registers (4 rows x 4 vectors), each
// V row read once for the rows. Every (row, dim) sum is a chain of FMAs over j in order whatever
// the other rows, so a row's output is the same alone or with others.
template <typename T, int R>
void pv_rows(const float* p, int64_t p_stride, int first_row, int group, int64_t first_keys,
             const float* inv_sum, const T* v, int64_t v_stride, int dim, T* const* o) {
  int64_t keys[R];
  for (int r = 0; r < R; ++r) keys[r] = first_keys + (first_row + r) / group;
  for (int d0 = 0; d0 < dim; d0 += 64) {
    const int width = dim - d0 < 64 ? dim - d0 : 64;
    const int vecs = (width + 15) / 16;
    __mmask16 mask[4];
    for (int c = 0; c < 4; ++c) mask[c] = c < vecs ? tail(width - 16 * c) : 0;
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    // All rows take keys below the first row's count; the rest only the rows that see them.
    for (int64_t j = 0; j < keys[R - 1]; ++j) {
      const T* vj = v + j * v_stride + d0;
      __m512 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = c < vecs ? load_ps(vj + 16 * c, mask[c]) : __m512{};
      for (int r = 0; r < R; ++r) {
        if (j >= keys[r]) continue;
        const __m512 pj = _mm512_set1_ps(p[r * p_stride + j]);
        for (int c = 0; c < 4; ++c) {
          if (c < vecs) acc[r][c] = _mm512_fmadd_ps(pj, vv[c], acc[r][c]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(64) float out[64];
      for (int c = 0; c < vecs; ++c) {
        _mm512_store_ps(out + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv_sum[r])));
      }
      for (int d = 0; d < width; ++d) moe_gemm::store(o[r] + d0 + d, out[d]);
    }
  }
}

}  // namespace detail
#pragma GCC pop_options
#endif  // PM_X86_SIMD

// Scratch floats attend_window needs for `rows` query rows (positions x group) over at most
// `keys` keys.
inline int64_t window_scratch(int64_t rows, int64_t keys) { return rows * (keys + 1); }

// For one KV head: `positions` consecutive query positions, each with the GQA group's `group`
// query rows (row g of position i at q + i * q_pos_stride + g * q_head_stride, contiguous head
// dim); position i attends to keys 0..first_keys + i - 1 of k/v (row stride kv_stride): o[i, g] =
// softmax(scale · q[i, g]·K^T) · V, written at o + i * o_pos_stride + g * o_head_stride. q_rows
// holds positions · group · dim T, scratch window_scratch(positions · group, first_keys +
// positions - 1) floats. T is float or BF16. first_keys >= 1. Returns false (nothing written)
// where this CPU has no AVX-512: the caller's portable loop runs.
template <typename T>
bool attend_window(const T* q, int64_t q_pos_stride, int64_t q_head_stride, int positions,
                   int group, int dim, const T* k, const T* v, int64_t kv_stride,
                   int64_t first_keys, float scale, T* q_rows, float* scratch, T* o,
                   int64_t o_pos_stride, int64_t o_head_stride) {
#if defined(PM_X86_SIMD)
  if (moe_gemm::cpu_isa() == moe_gemm::CpuIsa::kGeneric || first_keys <= 0) return false;
  const int rows = positions * group;
  const int64_t keys = first_keys + positions - 1;              // the last position's
  float* scores = scratch;                                      // [rows, keys]
  float* inv_sum = scores + static_cast<int64_t>(rows) * keys;  // [rows]
  for (int r = 0; r < rows; ++r) {
    const T* src = q + (r / group) * q_pos_stride + (r % group) * q_head_stride;
    for (int d = 0; d < dim; ++d) q_rows[r * dim + d] = src[d];
  }
  // Every row's scores over the last position's keys: a column's value does not depend on the
  // call's width (skinny_gemm_x86.h), so a row's first keys are what its own call would give.
  moe_gemm::skinny_gemm_nt_ld(q_rows, dim, rows, dim, k, kv_stride, 0, keys, scores, keys);
  for (int r = 0; r < rows; ++r) {
    inv_sum[r] = detail::softmax_row(scores + r * keys, first_keys + r / group, scale);
  }
  for (int r0 = 0; r0 < rows; r0 += 4) {
    T* out[4];
    const int n = rows - r0 < 4 ? rows - r0 : 4;
    for (int r = 0; r < n; ++r) {
      const int row = r0 + r;
      out[r] = o + (row / group) * o_pos_stride + (row % group) * o_head_stride;
    }
    const float* p = scores + static_cast<int64_t>(r0) * keys;
    const float* is = inv_sum + r0;
    if (n == 4) {
      detail::pv_rows<T, 4>(p, keys, r0, group, first_keys, is, v, kv_stride, dim, out);
    } else if (n == 3) {
      detail::pv_rows<T, 3>(p, keys, r0, group, first_keys, is, v, kv_stride, dim, out);
    } else if (n == 2) {
      detail::pv_rows<T, 2>(p, keys, r0, group, first_keys, is, v, kv_stride, dim, out);
    } else {
      detail::pv_rows<T, 1>(p, keys, r0, group, first_keys, is, v, kv_stride, dim, out);
    }
  }
  return true;
#else
  (void)q, (void)q_pos_stride, (void)q_head_stride, (void)positions, (void)group, (void)dim;
  (void)k, (void)v, (void)kv_stride, (void)first_keys, (void)scale, (void)q_rows, (void)scratch;
  (void)o;
  (void)o_pos_stride, (void)o_head_stride;
  return false;
#endif
}

}  // namespace pearlmoe::attention_cpu
