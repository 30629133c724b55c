// Torch-free CPU GEMM for a few rows against a large weight: c = a · b^T with a [M, K] (M small),
// b [N, K]. At decode sizes a CPU is bound by streaming the weights (and, a little above that, by
// the multiply-adds), and BLAS packs b for its tiled kernel, reading it more than once and paying
// a fixed cost per call that dwarfs a 256 x 256 product. This reads each b row once, four rows at
// a time, and takes up to four a rows' dot products against them from registers. fp32
// accumulation.
//
// Three code paths, picked once per process by what the CPU has (PEARLMOE_CPU_ISA=generic,
// avx512 or avx512bf16 caps it, for tests and comparisons):
//   avx512bf16  bf16 weights: VDPBF16PS, 32 bf16 products per instruction, accumulated in fp32
//               (the products are exact; only the summation order differs from fp32 FMAs);
//   avx512      fp32 weights: FMA; bf16 weights: widened to fp32 on load, a widened once;
//   generic     portable loops the compiler vectorises (any CPU).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PM_X86_SIMD 1
#endif

namespace pearlmoe::moe_gemm {

// Up to this many rows the dense projections and the experts go through the skinny kernel, which
// computes each row on its own in a fixed order: a token's result does not depend on how many
// rows share the call, so a server's decode and verification steps (up to 16 sequences x 9-token
// windows = 144 rows) give every sequence what decoding it alone gives (greedy speculative and
// PEARL output equal to autoregressive output). At few rows it is also the fast kernel (8 rows of
// a 256 x 256 bf16 weight: ~8x BLAS on the 2-core Zen 4; fp32 ~2x); above 16 rows BLAS's tiles
// would be faster, which only prefills of 17-256 tokens give up (bench/NOTES.md).
constexpr int64_t kSkinnyMaxRows = 256;

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

enum class CpuIsa { kGeneric = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

inline const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16:
      return "avx512bf16";
    case CpuIsa::kAvx512:
      return "avx512";
    default:
      return "generic";
  }
}

// The best path this CPU runs, capped by PEARLMOE_CPU_ISA; detected once per process.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::kGeneric;
#if defined(PM_X86_SIMD)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
      best = CpuIsa::kAvx512;
      if (__builtin_cpu_supports("avx512bf16")) best = CpuIsa::kAvx512Bf16;
    }
#endif
    if (const char* cap = std::getenv("PEARLMOE_CPU_ISA")) {
      const std::string_view want(cap);
      CpuIsa capped = best;
      if (want == "generic") capped = CpuIsa::kGeneric;
      if (want == "avx512") capped = CpuIsa::kAvx512;
      if (static_cast<int>(capped) < static_cast<int>(best)) best = capped;
    }
    return best;
  }();
  return isa;
}

namespace detail {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PM_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PM_SIMD_CLONES
#endif

// Portable path: rows n_begin..n_end of c, with a already in fp32 ([M, K], contiguous). 16
// independent partial sums per dot product let the compiler vectorise without reassociating.
template <typename T, typename Out>
PM_SIMD_CLONES void skinny_rows(const float* a, int64_t rows, int64_t k, const T* b, int64_t ldb,
                                int64_t n_begin, int64_t n_end, Out* c, int64_t ldc, float* b_row) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const T* src = b + n * ldb;
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

#if defined(PM_X86_SIMD)
// The x86 paths: one source, compiled twice under different target options (so a CPU without
// AVX512-BF16 never runs an instruction it lacks), each copy in its own namespace.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
namespace detail::avx512 {
#define PM_SKINNY_BF16_DOT 0
#include "skinny_gemm_x86.h"
#undef PM_SKINNY_BF16_DOT
}  // namespace detail::avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
namespace detail::avx512bf16 {
#define PM_SKINNY_BF16_DOT 1
#include "skinny_gemm_x86.h"
#undef PM_SKINNY_BF16_DOT
}  // namespace detail::avx512bf16
#pragma GCC pop_options
#endif  // PM_X86_SIMD

// c [M, N] (row stride ldc) = a [M, K] (row stride lda) · b [N, K]^T (row stride ldb) for rows
// n_begin..n_end of b; any M (it is meant for M <= kSkinnyMaxRows). T is float or BF16; the output
// Out is T or float (fp32 sums, unrounded).
template <typename T, typename Out>
void skinny_gemm_nt_ld(const T* a, int64_t lda, int64_t rows, int64_t k, const T* b, int64_t ldb,
                       int64_t n_begin, int64_t n_end, Out* c, int64_t ldc) {
  if (rows <= 0 || n_end <= n_begin) return;
  const CpuIsa isa = cpu_isa();
#if defined(PM_X86_SIMD)
  if constexpr (std::is_same_v<T, float>) {
    if (isa != CpuIsa::kGeneric) {
      detail::avx512::kernel_rows<detail::avx512::Fp32Fma>(a, lda, rows, k, b, ldb, n_begin, n_end,
                                                           c, ldc);
      return;
    }
  } else {
    const auto* bb = reinterpret_cast<const uint16_t*>(b);
    if (isa == CpuIsa::kAvx512Bf16) {
      detail::avx512bf16::kernel_rows<detail::avx512bf16::Bf16Dot>(
          reinterpret_cast<const uint16_t*>(a), lda, rows, k, bb, ldb, n_begin, n_end, c, ldc);
      return;
    }
    if (isa == CpuIsa::kAvx512) {
      std::vector<float> a32(rows * k);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < k; ++i) a32[r * k + i] = to_float(a[r * lda + i]);
      }
      detail::avx512::kernel_rows<detail::avx512::Bf16Widen>(a32.data(), k, rows, k, bb, ldb,
                                                             n_begin, n_end, c, ldc);
      return;
    }
  }
#endif
  (void)isa;
  std::vector<float> a32(rows * k), b_row(k);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < k; ++i) a32[r * k + i] = to_float(a[r * lda + i]);
  }
  detail::skinny_rows(a32.data(), rows, k, b, ldb, n_begin, n_end, c, ldc, b_row.data());
}

// The usual case: b [N, K] contiguous, c in a's type.
template <typename T>
void skinny_gemm_nt(const T* a, int64_t lda, int64_t rows, int64_t k, const T* b, int64_t n_begin,
                    int64_t n_end, T* c, int64_t ldc) {
  skinny_gemm_nt_ld(a, lda, rows, k, b, k, n_begin, n_end, c, ldc);
}

}  // namespace pearlmoe::moe_gemm
