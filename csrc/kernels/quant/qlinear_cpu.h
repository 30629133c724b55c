// Torch-free CPU kernels for GGUF-quantised weights (gguf_blocks.h): c = x · dequant(w)^T for a
// few rows of x (decode, verification), reading each weight block once and expanding it in
// registers, and the expansion of whole rows (prefill, which then multiplies on BLAS).
//
// At decode sizes a CPU is bound by streaming the weights: a Q4_1 row is 0.625 bytes a value
// against bf16's 2, so a 4-bit model reads 3.2x fewer bytes per token. Every x row is computed on
// its own in a fixed order (like the skinny kernel), so a token's result does not depend on how
// many rows share the call. The sums are fp32 over exactly expanded fp32 weights.
//
// Paths (moe_gemm::cpu_isa()): AVX-512 (+F16C for the scales), and a portable one.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "../moe_gemm/skinny_gemm_cpu.h"
#include "gguf_blocks.h"

namespace pearlmoe::quant {

namespace detail {

// Portable path: rows n_begin..n_end of c for x [rows, K] fp32 (row stride ldx).
template <typename Out>
void qlinear_rows_generic(Format f, const float* x, int64_t ldx, int64_t rows, int64_t k,
                          const uint8_t* w, int64_t ldw, int64_t n_begin, int64_t n_end, Out* c,
                          int64_t ldc) {
  std::vector<float> row(k);
  const int64_t blocks = k / kBlockValues, bytes = block_bytes(f);
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      dequantize_block(f, w + n * ldw + b * bytes, row.data() + b * kBlockValues);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * ldx;
      float lanes[16] = {};
      for (int64_t i = 0; i < k; i += 16) {
        for (int j = 0; j < 16; ++j) lanes[j] += xr[i + j] * row[i + j];
      }
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += lanes[j];
      moe_gemm::store(c + r * ldc + n, sum);
    }
  }
}

}  // namespace detail

#if defined(PM_X86_SIMD)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,f16c")
namespace detail::avx512 {

// Each format expands one block into two 16-lane fp32 vectors (values 0..15 and 16..31).
struct Q4_0 {
  static constexpr int kBytes = 18;
  static void expand(const uint8_t* b, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(load_u16(b))));
    const __m512 m = _mm512_mul_ps(d, _mm512_set1_ps(-8.f));  // (q - 8)·d = q·d - 8d, exact
    nibbles(b + 2, d, m, lo, hi);
  }
  static void nibbles(const uint8_t* q16, __m512 d, __m512 m, __m512& lo, __m512& hi) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q16));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i l = _mm_and_si128(q, mask), h = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(l)), d, m);
    hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(h)), d, m);
  }
};

struct Q4_1 {
  static constexpr int kBytes = 20;
  static void expand(const uint8_t* b, __m512& lo, __m512& hi) {
    uint32_t dm;
    std::memcpy(&dm, b, sizeof(dm));
    const __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm)));  // d, m
    Q4_0::nibbles(b + 4, _mm512_broadcastss_ps(s), _mm512_broadcastss_ps(_mm_movehdup_ps(s)), lo,
                  hi);
  }
};

struct Q8_0 {
  static constexpr int kBytes = 34;
  static void expand(const uint8_t* b, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(load_u16(b))));
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
  }
};

// out[r * 4 + j] = x row r · w row j, for MB x rows and NB (4 or 1) w rows: each block of the NB
// rows is expanded once and multiplied into MB x NB independent accumulators. ahead: the same
// rows kPrefetchRows further on (or null), requested while these are summed (as in the skinny
// kernel: short row streams that the hardware prefetchers barely start on).
template <typename F, int MB, int NB>
inline void block(const float* x, int64_t ldx, int64_t blocks, const uint8_t* w, int64_t ldw,
                  float* out, const uint8_t* ahead) {
  __m512 acc[MB][NB];
#pragma GCC unroll 4
  for (int r = 0; r < MB; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 lo[NB], hi[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) F::expand(w + j * ldw + b * F::kBytes, lo[j], hi[j]);
    if (ahead != nullptr) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + j * ldw + b * F::kBytes), _MM_HINT_T0);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MB; ++r) {
      const __m512 xl = _mm512_loadu_ps(x + r * ldx + b * kBlockValues);
      const __m512 xh = _mm512_loadu_ps(x + r * ldx + b * kBlockValues + 16);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        acc[r][j] = _mm512_fmadd_ps(lo[j], xl, acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(hi[j], xh, acc[r][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MB; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) out[r * 4 + j] = _mm512_reduce_add_ps(acc[r][j]);
  }
}

constexpr int64_t kPrefetchRows = 32;

template <typename F, int NB, typename Out>
inline void column_block(const float* x, int64_t ldx, int64_t rows, int64_t blocks,
                         const uint8_t* w, int64_t ldw, int64_t n, int64_t n_end, Out* c,
                         int64_t ldc) {
  float out[4 * 4];
  const uint8_t* wn = w + n * ldw;
  const uint8_t* ahead = n + kPrefetchRows + NB <= n_end ? wn + kPrefetchRows * ldw : nullptr;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t mb = rows - r0 < 4 ? rows - r0 : 4;
    const float* xr = x + r0 * ldx;
    const uint8_t* pf = r0 == 0 ? ahead : nullptr;  // later row groups find w cached
    if (mb == 4) {
      block<F, 4, NB>(xr, ldx, blocks, wn, ldw, out, pf);
    } else if (mb == 3) {
      block<F, 3, NB>(xr, ldx, blocks, wn, ldw, out, pf);
    } else if (mb == 2) {
      block<F, 2, NB>(xr, ldx, blocks, wn, ldw, out, pf);
    } else {
      block<F, 1, NB>(xr, ldx, blocks, wn, ldw, out, pf);
    }
    for (int64_t r = 0; r < mb; ++r) {
      for (int j = 0; j < NB; ++j) moe_gemm::store(c + (r0 + r) * ldc + n + j, out[r * 4 + j]);
    }
  }
}

template <typename F, typename Out>
void kernel_rows(const float* x, int64_t ldx, int64_t rows, int64_t k, const uint8_t* w,
                 int64_t ldw, int64_t n_begin, int64_t n_end, Out* c, int64_t ldc) {
  const int64_t blocks = k / kBlockValues;
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) column_block<F, 4>(x, ldx, rows, blocks, w, ldw, n, n_end, c, ldc);
  for (; n < n_end; ++n) column_block<F, 1>(x, ldx, rows, blocks, w, ldw, n, n_end, c, ldc);
}

}  // namespace detail::avx512
#pragma GCC pop_options

// bf16 x on CPUs with AVX512-BF16: a block's 32 q become bf16 words (exact: at most 8 bits) by a
// table lookup, VDPBF16PS takes their exact products with x, and the block's sum is scaled once:
//   x · w = d · (x · q) + m · sum(x)   (Q4_0: m = -8d; Q8_0: m = 0, q signed, widened via fp32)
// Half the fp32 path's floating-point work per block, which is what bounds it on 2 cores.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,f16c,fma")
namespace detail::avx512bf16 {

// bf16 bits of 0..15, indexed by each nibble (vpermw reads 5 index bits; 16..31 unused).
alignas(64) inline constexpr uint16_t kNibbleBf16[32] = {
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

// Each format gives its 32 q as bf16 words, and its scales: for one row, d broadcast and the
// offset m (x·w = d·(x·q) + m·Σx; Q4_0: m = -8d, Q8_0: none); for four rows at once, one fp16
// conversion of all their scales, d_j picked from it (cheaper than four scalar conversions and
// broadcasts) and the m_j in lanes the offset sums accumulate in.
template <bool kOffset>  // Q4_1 (d, m) or Q4_0 (d; m = -8d)
struct Q4 {
  static constexpr int kBytes = kOffset ? 20 : 18;
  static constexpr bool kHasOffset = true;
  static __m512i values(const uint8_t* b, __m512i table) {
    // Byte j widened to a word holds value j (low nibble) and value j + 16 (high nibble).
    const __m256i words = _mm256_cvtepu8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (kOffset ? 4 : 2))));
    const __m256i lo = _mm256_and_si256(words, _mm256_set1_epi16(0x0f));
    const __m256i hi = _mm256_srli_epi16(words, 4);
    return _mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), table);
  }
  static void scale1(const uint8_t* b, __m512& d, float& m) {
    if constexpr (kOffset) {
      uint32_t dm;
      std::memcpy(&dm, b, sizeof(dm));
      const __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm)));
      d = _mm512_broadcastss_ps(s);
      m = _mm_cvtss_f32(_mm_movehdup_ps(s));
    } else {
      const __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128(load_u16(b)));
      d = _mm512_broadcastss_ps(s);
      m = -8.f * _mm_cvtss_f32(s);
    }
  }
  // d of rows 0..3 and a vector whose lane kLane[j] holds m_j.
  static constexpr int kLane[4] = {kOffset ? 1 : 0, kOffset ? 3 : 1, kOffset ? 5 : 2,
                                   kOffset ? 7 : 3};
  static void scale4(const uint8_t* b, int64_t ldw, __m512 d[4], __m256& m) {
    __m256 s;
    if constexpr (kOffset) {  // d0 m0 d1 m1 d2 m2 d3 m3
      uint32_t dm[4];
      for (int j = 0; j < 4; ++j) std::memcpy(&dm[j], b + j * ldw, sizeof(uint32_t));
      s = _mm256_cvtph_ps(_mm_setr_epi32(static_cast<int>(dm[0]), static_cast<int>(dm[1]),
                                         static_cast<int>(dm[2]), static_cast<int>(dm[3])));
      m = s;
    } else {  // d0 d1 d2 d3, m = -8d exactly
      s = _mm256_cvtph_ps(_mm_setr_epi16(static_cast<int16_t>(load_u16(b)),
                                         static_cast<int16_t>(load_u16(b + ldw)),
                                         static_cast<int16_t>(load_u16(b + 2 * ldw)),
                                         static_cast<int16_t>(load_u16(b + 3 * ldw)), 0, 0, 0, 0));
      m = _mm256_mul_ps(s, _mm256_set1_ps(-8.f));
    }
    const __m512 wide = _mm512_castps256_ps512(s);
    for (int j = 0; j < 4; ++j) {
      d[j] = _mm512_permutexvar_ps(_mm512_set1_epi32(kOffset ? 2 * j : j), wide);
    }
  }
};

struct Q8 {
  static constexpr int kBytes = 34;
  static constexpr bool kHasOffset = false;
  static constexpr int kLane[4] = {0, 1, 2, 3};
  static __m512i values(const uint8_t* b, __m512i) {
    const __m512 lo = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))));
    const __m512 hi = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))));
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // exact: |q| <= 128
  }
  static void scale1(const uint8_t* b, __m512& d, float& m) {
    d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(load_u16(b))));
    m = 0.f;
  }
  static void scale4(const uint8_t* b, int64_t ldw, __m512 d[4], __m256& m) {
    const __m256 s = _mm256_cvtph_ps(
        _mm_setr_epi16(static_cast<int16_t>(load_u16(b)), static_cast<int16_t>(load_u16(b + ldw)),
                       static_cast<int16_t>(load_u16(b + 2 * ldw)),
                       static_cast<int16_t>(load_u16(b + 3 * ldw)), 0, 0, 0, 0));
    const __m512 wide = _mm512_castps256_ps512(s);
    for (int j = 0; j < 4; ++j) d[j] = _mm512_permutexvar_ps(_mm512_set1_epi32(j), wide);
    m = _mm256_setzero_ps();
  }
};

// As avx512::block, for bf16 x rows; sx [MB rows, blocks] holds each x block's fp32 sum. A
// column's arithmetic is the same in the one-row (NB = 1) and four-row forms: the offsets are
// fused multiply-adds of the same m and Σx in both.
template <typename F, int MB, int NB>
inline void block(const uint16_t* x, int64_t ldx, const float* sx, int64_t blocks, const uint8_t* w,
                  int64_t ldw, float* out, const uint8_t* ahead) {
  const __m512i table = _mm512_load_si512(kNibbleBf16);
  __m512 acc[MB][NB];
  __m256 offsets[MB];  // NB = 4: lane F::kLane[j] sums m_j · Σx
  float offset[MB];    // NB = 1
#pragma GCC unroll 4
  for (int r = 0; r < MB; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
    offsets[r] = _mm256_setzero_ps();
    offset[r] = 0.f;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * F::kBytes;
    __m512i q[NB];
    __m512 d[4];
    __m256 m4;
    float m1 = 0.f;
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) q[j] = F::values(wb + j * ldw, table);
    if constexpr (NB == 4) {
      F::scale4(wb, ldw, d, m4);
    } else {
      F::scale1(wb, d[0], m1);
    }
    if (ahead != nullptr) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + j * ldw + b * F::kBytes), _MM_HINT_T0);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MB; ++r) {
      const __m512i xv = _mm512_loadu_si512(x + r * ldx + b * kBlockValues);
      const float s = sx[r * blocks + b];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(q[j]),
                                            reinterpret_cast<__m512bh>(xv));
        acc[r][j] = _mm512_fmadd_ps(dot, d[j], acc[r][j]);
      }
      if constexpr (F::kHasOffset) {
        if constexpr (NB == 4) {
          offsets[r] = _mm256_fmadd_ps(m4, _mm256_set1_ps(s), offsets[r]);
        } else {
          offset[r] =
              _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(m1), _mm_set_ss(s), _mm_set_ss(offset[r])));
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MB; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, offsets[r]);
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const float off = NB == 4 ? lanes[F::kLane[j]] : offset[r];
      out[r * 4 + j] = _mm512_reduce_add_ps(acc[r][j]) + off;
    }
  }
}

template <typename F, int NB, typename Out>
inline void column_block(const uint16_t* x, int64_t ldx, const float* sx, int64_t rows,
                         int64_t blocks, const uint8_t* w, int64_t ldw, int64_t n, int64_t n_end,
                         Out* c, int64_t ldc) {
  float out[4 * 4];
  const uint8_t* wn = w + n * ldw;
  const uint8_t* ahead =
      n + avx512::kPrefetchRows + NB <= n_end ? wn + avx512::kPrefetchRows * ldw : nullptr;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t mb = rows - r0 < 4 ? rows - r0 : 4;
    const uint16_t* xr = x + r0 * ldx;
    const float* sr = sx + r0 * blocks;
    const uint8_t* pf = r0 == 0 ? ahead : nullptr;
    if (mb == 4) {
      block<F, 4, NB>(xr, ldx, sr, blocks, wn, ldw, out, pf);
    } else if (mb == 3) {
      block<F, 3, NB>(xr, ldx, sr, blocks, wn, ldw, out, pf);
    } else if (mb == 2) {
      block<F, 2, NB>(xr, ldx, sr, blocks, wn, ldw, out, pf);
    } else {
      block<F, 1, NB>(xr, ldx, sr, blocks, wn, ldw, out, pf);
    }
    for (int64_t r = 0; r < mb; ++r) {
      for (int j = 0; j < NB; ++j) moe_gemm::store(c + (r0 + r) * ldc + n + j, out[r * 4 + j]);
    }
  }
}

template <typename F, typename Out>
void kernel_rows(const uint16_t* x, int64_t ldx, int64_t rows, int64_t k, const uint8_t* w,
                 int64_t ldw, int64_t n_begin, int64_t n_end, Out* c, int64_t ldc) {
  const int64_t blocks = k / kBlockValues;
  std::vector<float> sx(rows * blocks);  // each x block's sum, fp32
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint16_t* p = x + r * ldx + b * kBlockValues;
      const __m512i v = _mm512_loadu_si512(p);
      const __m512 lo = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
      const __m512 hi = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
      sx[r * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
  }
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) {
    column_block<F, 4>(x, ldx, sx.data(), rows, blocks, w, ldw, n, n_end, c, ldc);
  }
  for (; n < n_end; ++n)
    column_block<F, 1>(x, ldx, sx.data(), rows, blocks, w, ldw, n, n_end, c, ldc);
}

}  // namespace detail::avx512bf16
#pragma GCC pop_options
#endif  // PM_X86_SIMD

// c [rows, N] (row stride ldc; float or moe_gemm::BF16) = x [rows, K] (X = float or
// moe_gemm::BF16, row stride ldx) · dequant(w)^T for rows n_begin..n_end of w [N, K / 32 blocks]
// (row stride ldw bytes). K is a multiple of 32.
template <typename X, typename Out>
void qlinear_rows(Format f, const X* x, int64_t ldx, int64_t rows, int64_t k, const uint8_t* w,
                  int64_t ldw, int64_t n_begin, int64_t n_end, Out* c, int64_t ldc) {
  if (rows <= 0 || n_end <= n_begin) return;
  if constexpr (std::is_same_v<X, moe_gemm::BF16>) {
#if defined(PM_X86_SIMD)
    if (moe_gemm::cpu_isa() == moe_gemm::CpuIsa::kAvx512Bf16) {
      namespace a = detail::avx512bf16;
      const auto* xb = reinterpret_cast<const uint16_t*>(x);
      switch (f) {
        case Format::kQ4_0:
          return a::kernel_rows<a::Q4<false>>(xb, ldx, rows, k, w, ldw, n_begin, n_end, c, ldc);
        case Format::kQ4_1:
          return a::kernel_rows<a::Q4<true>>(xb, ldx, rows, k, w, ldw, n_begin, n_end, c, ldc);
        case Format::kQ8_0:
          return a::kernel_rows<a::Q8>(xb, ldx, rows, k, w, ldw, n_begin, n_end, c, ldc);
      }
    }
#endif
    std::vector<float> x32(rows * k);  // no bf16 dot products here: the fp32 path
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < k; ++i) x32[r * k + i] = moe_gemm::to_float(x[r * ldx + i]);
    }
    qlinear_rows(f, x32.data(), k, rows, k, w, ldw, n_begin, n_end, c, ldc);
  } else {
    static_assert(std::is_same_v<X, float>, "x is float or BF16");
#if defined(PM_X86_SIMD)
    if (moe_gemm::cpu_isa() != moe_gemm::CpuIsa::kGeneric) {
      namespace a = detail::avx512;
      switch (f) {
        case Format::kQ4_0:
          return a::kernel_rows<a::Q4_0>(x, ldx, rows, k, w, ldw, n_begin, n_end, c, ldc);
        case Format::kQ4_1:
          return a::kernel_rows<a::Q4_1>(x, ldx, rows, k, w, ldw, n_begin, n_end, c, ldc);
        case Format::kQ8_0:
          return a::kernel_rows<a::Q8_0>(x, ldx, rows, k, w, ldw, n_begin, n_end, c, ldc);
      }
    }
#endif
    detail::qlinear_rows_generic(f, x, ldx, rows, k, w, ldw, n_begin, n_end, c, ldc);
  }
}

// Rows n_begin..n_end of w expanded to fp32 into out [N, K] (contiguous).
inline void dequantize_rows(Format f, const uint8_t* w, int64_t ldw, int64_t k, int64_t n_begin,
                            int64_t n_end, float* out) {
  const int64_t blocks = k / kBlockValues, bytes = block_bytes(f);
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      dequantize_block(f, w + n * ldw + b * bytes, out + n * k + b * kBlockValues);
    }
  }
}

}  // namespace pearlmoe::quant
