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

// The largest of x[0..n), or NaN if any is NaN.
inline float max_or_nan_scalar(const float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    top = std::max(top, x[i]);
  }
  return top;
}

#if defined(PM_X86_SIMD)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
// Whether any of x[0..16) is above floor.
inline bool above_avx512(const float* x, float floor) {
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(x), _mm512_set1_ps(floor), _CMP_GT_OQ) != 0;
}

inline float max_or_nan_avx512(const float* x, int64_t n) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = simd::tail(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(vmax);
}
#pragma GCC pop_options
#endif

inline float max_or_nan(const float* x, int64_t n) {
#if defined(PM_X86_SIMD)
  if (moe_gemm::cpu_isa() != moe_gemm::CpuIsa::kGeneric) return max_or_nan_avx512(x, n);
#endif
  return max_or_nan_scalar(x, n);
}

// The k-th largest of x[0..n) (0 < k < n; duplicates counted; NaN never counts): a min-heap of
// the k largest seen, which most values fail to enter on one comparison (blocks of 16 with
// AVX-512), where nth_element over a copy took ~120 us for SmolLM2's 49152 logits.
inline float kth_largest(const float* x, int64_t n, int64_t k, std::vector<float>& heap) {
  heap.clear();
  int64_t i = 0;
  for (; i < n && static_cast<int64_t>(heap.size()) < k; ++i) {
    if (!std::isnan(x[i])) heap.push_back(x[i]);
  }
  if (static_cast<int64_t>(heap.size()) < k) return -std::numeric_limits<float>::infinity();
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  float floor = heap.front();
  auto offer = [&](float v) {
    if (!(v > floor)) return;
    std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
    heap.back() = v;
    std::push_heap(heap.begin(), heap.end(), std::greater<float>());
    floor = heap.front();
  };
#if defined(PM_X86_SIMD)
  if (moe_gemm::cpu_isa() != moe_gemm::CpuIsa::kGeneric) {
    for (; i + 16 <= n; i += 16) {
      if (above_avx512(x + i, floor)) {
        for (int64_t j = i; j < i + 16; ++j) offer(x[j]);
      }
    }
  }
#endif
  for (; i < n; ++i) offer(x[i]);
  return floor;
}

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
  if (params.temperature != 1.f) {
    for (int64_t v = 0; v < vocab; ++v) row[v] /= params.temperature;
  }
  if (params.top_k > 0 && params.top_k < vocab) {
    // Below the k-th largest value: out (ties at the k-th all stay, as the reference's `<` keeps).
    const float kth = detail::kth_largest(row, vocab, params.top_k, scratch);
    for (int64_t v = 0; v < vocab; ++v) {
      if (row[v] < kth) row[v] = -std::numeric_limits<float>::infinity();
    }
  }
  const float top = detail::max_or_nan(row, vocab);
  if (!std::isfinite(top)) return false;  // NaN, or every logit -inf
  const float inv = static_cast<float>(1.0 / detail::exp_shift(row, vocab, top));
  for (int64_t v = 0; v < vocab; ++v) row[v] *= inv;
  if (params.top_p > 0.f && params.top_p < 1.f) {
    // The most probable tokens first; a token goes once the mass before it reaches top_p (the
    // first always stays). Only tokens with mass are ranked (after top-k, k of them), sorted a
    // growing head at a time: the kept head is usually short.
    order.clear();
    for (int64_t v = 0; v < vocab; ++v) {
      if (row[v] > 0.f) order.push_back(static_cast<int32_t>(v));
    }
    const int64_t ranked = static_cast<int64_t>(order.size());
    auto more = [&](int32_t a, int32_t b) {
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    };
    int64_t sorted = 0, head = std::min<int64_t>(64, ranked), kept = ranked;
    float before = 0.f;
    while (kept == ranked) {
      std::partial_sort(order.begin() + sorted, order.begin() + head, order.end(), more);
      for (; sorted < head; ++sorted) {
        if (before >= params.top_p) {
          kept = sorted;
          break;
        }
        before += row[order[sorted]];
      }
      if (head == ranked) break;
      head = std::min<int64_t>(head * 4, ranked);
    }
    if (kept < ranked) {
      // Every token past the sorted head has at most the mass of the last kept one, so the
      // whole unsorted tail goes too.
      double total = 0.0;
      for (int64_t i = 0; i < kept; ++i) total += row[order[i]];
      for (int64_t i = kept; i < ranked; ++i) row[order[i]] = 0.f;
      const float renorm = static_cast<float>(1.0 / total);
      for (int64_t i = 0; i < kept; ++i) row[order[i]] *= renorm;
    }
  }
  return true;
}

namespace detail {

// The sum of x[0..n) for n <= kDrawChunk, in fp32.
constexpr int64_t kDrawChunk = 64;
inline float chunk_sum_scalar(const float* x, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum;
}

#if defined(PM_X86_SIMD)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
inline float chunk_sum_avx512(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    acc = _mm512_add_ps(acc, simd::load_ps(x + i, simd::tail(n - i)));
  return _mm512_reduce_add_ps(acc);
}
#pragma GCC pop_options
#endif

inline float chunk_sum(const float* x, int64_t n) {
#if defined(PM_X86_SIMD)
  if (moe_gemm::cpu_isa() != moe_gemm::CpuIsa::kGeneric) return chunk_sum_avx512(x, n);
#endif
  return chunk_sum_scalar(x, n);
}

}  // namespace detail

// A token drawn from probabilities row [vocab] (>= 0, some mass) with u in [0, 1) by inverse
// CDF: the first token whose running mass passes u times the total; zero-mass tokens are never
// drawn. Whole chunks below the threshold are skipped on their sums, so a draw reads the row
// about twice at vector speed instead of branching on every token.
inline int64_t draw(const float* row, int64_t vocab, float u) {
  using detail::chunk_sum;
  using detail::kDrawChunk;
  double total = 0.0;
  for (int64_t c = 0; c < vocab; c += kDrawChunk) {
    total += chunk_sum(row + c, std::min(kDrawChunk, vocab - c));
  }
  const double threshold = static_cast<double>(u) * total;
  double cum = 0.0;
  for (int64_t c = 0; c < vocab; c += kDrawChunk) {
    const int64_t n = std::min(kDrawChunk, vocab - c);
    const double mass = chunk_sum(row + c, n);
    if (cum + mass <= threshold) {
      cum += mass;
      continue;
    }
    for (int64_t v = c; v < c + n; ++v) {
      if (row[v] <= 0.f) continue;
      cum += row[v];
      if (cum > threshold) return v;
    }
  }
  for (int64_t v = vocab - 1; v > 0; --v) {  // rounding left the threshold at the very top
    if (row[v] > 0.f) return v;
  }
  return 0;
}

}  // namespace pearlmoe::sampling_cpu
