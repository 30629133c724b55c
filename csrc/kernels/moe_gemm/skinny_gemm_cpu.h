// Torch-free CPU GEMM for a few rows against a large weight: c = a · b^T with a [M, K] (M small),
// b [N, K]. At decode sizes the expert FFN on a CPU is bound by streaming the weights, and BLAS
// packs b for its tiled kernel, reading it more than once; this reads each b row from memory
// once, then takes its M dot products from cache. fp32 accumulation.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pearlmoe::moe_gemm {

// Above this many rows BLAS's tiled kernel wins (measured on a 2-core AVX-512 machine: 2x BLAS's
// bandwidth at 4 rows, 0.85x at 8).
constexpr int64_t kSkinnyMaxRows = 4;

// bfloat16 as stored by torch: the high half of a float.
struct BF16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(BF16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void store(float* dst, float v) { *dst = v; }
inline void store(BF16* dst, float v) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    dst->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
  } else {
    dst->bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

namespace detail {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PM_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PM_SIMD_CLONES
#endif

// Rows n_begin..n_end of c, with a already in fp32 ([M, K], contiguous). 16 independent partial
// sums per dot product let the compiler vectorise without reassociating (no -ffast-math).
template <typename T>
PM_SIMD_CLONES void skinny_rows(const float* a, int64_t rows, int64_t k, const T* b,
                                int64_t n_begin, int64_t n_end, T* c, int64_t ldc, float* b_row) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const T* src = b + n * k;
    const float* row = b_row;
    if constexpr (std::is_same_v<T, float>) {
      row = src;  // already fp32: read it in place
    } else {
      for (int64_t i = 0; i < k; ++i) b_row[i] = to_float(src[i]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = a + r * k;
      float lanes[16] = {};
      int64_t i = 0;
      for (; i + 16 <= k; i += 16) {
        for (int j = 0; j < 16; ++j) lanes[j] += x[i + j] * row[i + j];
      }
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += lanes[j];
      for (; i < k; ++i) sum += x[i] * row[i];
      store(c + r * ldc + n, sum);
    }
  }
}

}  // namespace detail

// c [M, N] (row stride ldc) = a [M, K] (row stride lda) · b [N, K]^T for rows n_begin..n_end of b;
// M <= kSkinnyMaxRows. T is float or BF16.
template <typename T>
void skinny_gemm_nt(const T* a, int64_t lda, int64_t rows, int64_t k, const T* b, int64_t n_begin,
                    int64_t n_end, T* c, int64_t ldc) {
  std::vector<float> a32(rows * k), b_row(k);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < k; ++i) a32[r * k + i] = to_float(a[r * lda + i]);
  }
  detail::skinny_rows(a32.data(), rows, k, b, n_begin, n_end, c, ldc, b_row.data());
}

}  // namespace pearlmoe::moe_gemm
