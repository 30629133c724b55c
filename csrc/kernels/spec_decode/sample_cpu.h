// Torch-free sampling of a token from a row of logits on the CPU: the rules of
// pearlmoe.decode.sampling.logits_to_probs (temperature, then top-k, then top-p) and an
// inverse-CDF draw (spec_verify_cpu.h's sample_residual). The fused CPU decode loops sample
// inside their C++ calls with these, instead of returning to Python for a softmax and
// torch.multinomial at every step (bench/NOTES.md, decode loops v20).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "../moe_gemm/skinny_gemm_cpu.h"
#include "../simd_x86.h"

namespace pearlmoe::sampling_cpu {

struct SampleParams {
  float temperature = 1.f;  // > 0
  int64_t top_k = 0;        // keep the top_k largest logits; 0 (or >= V): all
  float top_p = 1.f;        // keep the smallest head of mass >= top_p; >= 1: all
};

namespace detail {

// x[i] = exp(x[i] - shift) for i < n; returns the sum.
inline double exp_shift_scalar(float* x, int64_t n, float shift) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

#if defined(PM_X86_SIMD)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
inline double exp_shift_avx512(float* x, int64_t n, float shift) {
  const __m512 vshift = _mm512_set1_ps(shift);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = simd::tail(n - i);
    const __m512 e = simd::exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vshift));
    _mm512_mask_storeu_ps(x + i, m, e);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(vsum);
}
#pragma GCC pop_options
#endif

inline double exp_shift(float* x, int64_t n, float shift) {
#if defined(PM_X86_SIMD)
  if (moe_gemm::cpu_isa() != moe_gemm::CpuIsa::kGeneric) return exp_shift_avx512(x, n, shift);
#endif
  return exp_shift_scalar(x, n, shift);
}

}  // namespace detail

// row [vocab]: fp32 logits in, probabilities out, in place. Returns false (the row untouched
// past the temperature and top-k) when the logits have no finite maximum (NaN, or all -inf):
// there is no distribution to sample. scratch and order are reused buffers.
inline bool probs_in_place(float* row, int64_t vocab, const SampleParams& params,
                           std::vector<float>& scratch, std::vector<int32_t>& order) {
  for (int64_t v = 0; v < vocab; ++v) row[v] /= params.temperature;
  if (params.top_k > 0 && params.top_k < vocab) {
    // Below the k-th largest value: out (ties at the k-th all stay, as the reference's `<` keeps).
    scratch.assign(row, row + vocab);
    std::nth_element(scratch.begin(), scratch.begin() + (params.top_k - 1), scratch.end(),
                     std::greater<float>());
    const float kth = scratch[params.top_k - 1];
    for (int64_t v = 0; v < vocab; ++v) {
      if (row[v] < kth) row[v] = -std::numeric_limits<float>::infinity();
    }
  }
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < vocab; ++v) {
    if (std::isnan(row[v])) return false;
    top = std::max(top, row[v]);
  }
  if (!std::isfinite(top)) return false;
  const float inv = static_cast<float>(1.0 / detail::exp_shift(row, vocab, top));
  for (int64_t v = 0; v < vocab; ++v) row[v] *= inv;
  if (params.top_p > 0.f && params.top_p < 1.f) {
    // The most probable tokens first; a token goes once the mass before it reaches top_p (the
    // first always stays). Sorted a growing head at a time: the kept head is usually short.
    order.resize(vocab);
    std::iota(order.begin(), order.end(), 0);
    auto more = [&](int32_t a, int32_t b) {
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    };
    int64_t sorted = 0, head = std::min<int64_t>(64, vocab), kept = vocab;
    float before = 0.f;
    while (kept == vocab) {
      std::partial_sort(order.begin() + sorted, order.begin() + head, order.end(), more);
      for (; sorted < head; ++sorted) {
        if (before >= params.top_p) {
          kept = sorted;
          break;
        }
        before += row[order[sorted]];
      }
      if (head == vocab) break;
      head = std::min<int64_t>(head * 4, vocab);
    }
    if (kept < vocab) {
      // Every token past the sorted head has at most the mass of the last kept one, so the
      // whole unsorted tail goes too.
      double total = 0.0;
      for (int64_t i = 0; i < kept; ++i) total += row[order[i]];
      for (int64_t i = kept; i < vocab; ++i) row[order[i]] = 0.f;
      const float renorm = static_cast<float>(1.0 / total);
      for (int64_t i = 0; i < kept; ++i) row[order[i]] *= renorm;
    }
  }
  return true;
}

// A token drawn from probabilities row [vocab] with u in [0, 1) by inverse CDF (the first token
// whose running mass passes u times the total; zero-mass tokens are never drawn).
inline int64_t draw(const float* row, int64_t vocab, float u) {
  double total = 0.0;
  for (int64_t v = 0; v < vocab; ++v) total += row[v];
  const double threshold = static_cast<double>(u) * total;
  double cum = 0.0;
  int64_t last = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    if (row[v] <= 0.f) continue;
    cum += row[v];
    last = v;
    if (cum > threshold) return v;
  }
  return last;  // rounding left the threshold at the very top
}

}  // namespace pearlmoe::sampling_cpu
