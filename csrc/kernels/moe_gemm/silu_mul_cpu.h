// Torch-free SwiGLU activation for the CPU expert FFN: act[r, i] = silu(h[r, i]) * h[r, W + i]
// over rows of h [n, 2W], rounded where the reference rounds (silu to T, then the product to T).
// AVX-512 lanes where the CPU has them (the exp is Cephes' expf, within 2 ulp of std::exp); a
// scalar loop otherwise. Each element is computed on its own, so a row's result does not depend
// on the other rows.
#pragma once

#include <cmath>
#include <cstdint>

#include "../simd_x86.h"
#include "skinny_gemm_cpu.h"

namespace pearlmoe::moe_gemm {

#if defined(PM_X86_SIMD)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
namespace detail {

template <typename T>
void silu_mul_avx512(const T* h, int64_t n, int64_t width, T* act) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t r = 0; r < n; ++r) {
    const T* gate = h + r * 2 * width;
    for (int64_t i = 0; i < width; i += 16) {
      const __mmask16 m = simd::tail(width - i);
      const __m512 g = simd::load_ps(gate + i, m);
      __m512 s =
          _mm512_div_ps(g, _mm512_add_ps(one, simd::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      if constexpr (!std::is_same_v<T, float>) s = simd::round_bf16(s);
      simd::store_ps(act + r * width + i, m, _mm512_mul_ps(s, simd::load_ps(gate + width + i, m)));
    }
  }
}

}  // namespace detail
#pragma GCC pop_options
#endif  // PM_X86_SIMD

template <typename T>
void silu_mul(const T* h, int64_t n, int64_t width, T* act) {
#if defined(PM_X86_SIMD)
  if (cpu_isa() != CpuIsa::kGeneric) {
    detail::silu_mul_avx512(h, n, width, act);
    return;
  }
#endif
  for (int64_t r = 0; r < n; ++r) {
    const T* hr = h + r * 2 * width;
    T* ar = act + r * width;
    for (int64_t i = 0; i < width; ++i) {
      const float g = to_float(hr[i]);
      T silu;
      store(&silu, g / (1.f + std::exp(-g)));
      store(&ar[i], to_float(silu) * to_float(hr[width + i]));
    }
  }
}

}  // namespace pearlmoe::moe_gemm
