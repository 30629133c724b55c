// The x86 body of the skinny GEMM (skinny_gemm_cpu.h). No include guard on purpose: that header
// includes this file twice, inside `#pragma GCC target` regions for AVX-512 and AVX-512 + BF16,
// each time in its own namespace, so one source yields both instruction sets.
// Needs <immintrin.h>, BF16, to_float and store from skinny_gemm_cpu.h, and PM_SKINNY_BF16_DOT.

// The four sums of four 16-lane accumulators. Each sum adds only its own accumulator's lanes, in
// a tree that does not depend on the other three, so a tail column (reduce4(a, a, a, a)[0]) is
// summed exactly as the same column inside a 4-block: a column's value does not depend on the
// width of the call or on where a thread's share of the columns ends (attention scores each
// query row over its own number of keys; a window computes them all in one call).
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1));
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));  // 4 x [s0..s3]
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// How a path loads kStep elements of an a row and of a b row and multiply-adds them into 16 fp32
// lanes; Mask is the tail mask type of a kStep-element load.
struct Fp32Fma {  // a fp32, b fp32
  using A = float;
  using B = float;
  using Mask = __mmask16;
  static constexpr int kStep = 16;
  static __m512 load_a(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 load_b(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};

struct Bf16Widen {  // a fp32 (widened once by the caller), b bf16 widened on load
  using A = float;
  using B = uint16_t;
  using Mask = __mmask16;
  static constexpr int kStep = 16;
  static __m512 load_a(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 load_b(const uint16_t* p, Mask m) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static __m512 madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};

#if PM_SKINNY_BF16_DOT
struct Bf16Dot {  // a bf16, b bf16: VDPBF16PS adds a pair of exact products to each fp32 lane
  using A = uint16_t;
  using B = uint16_t;
  using Mask = __mmask32;
  static constexpr int kStep = 32;
  static __m512i load_a(const uint16_t* p, Mask m) { return _mm512_maskz_loadu_epi16(m, p); }
  static __m512i load_b(const uint16_t* p, Mask m) { return _mm512_maskz_loadu_epi16(m, p); }
  static __m512 madd(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
};
#endif

template <typename P>
inline typename P::Mask tail_mask(int64_t remaining) {
  using Mask = typename P::Mask;
  if (remaining >= P::kStep) return static_cast<Mask>(~Mask(0));
  return static_cast<Mask>((uint64_t(1) << remaining) - 1);
}

// out[r * 4 + j] = (a row r) · (b row j) over all of K, for MB rows of a and NB (4 or 1) rows of
// b: MB x NB independent accumulators keep the FMA pipes busy while b streams from memory.
//
// ahead: the same rows a prefetch distance further on (or null): they are requested from memory
// into L2 while these are summed. A block's NB rows are short streams (K values each) that the
// hardware prefetchers barely start on before the next block begins. Measured on the 2-core Zen 4
// VM, one thread, a 49152 x 576 bf16 weight from DRAM: 8-9 GB/s without; 10-12 GB/s prefetching
// into L1 (T0) 32 rows ahead; 18-22 GB/s into L2 (T1) 8-16 KB ahead, a plain sum's rate (L1 is
// 32 KB: lines prefetched that far into it are evicted before they are read).
template <typename P, int MB, int NB>
inline void block(const typename P::A* a, int64_t lda, int64_t k, const typename P::B* b,
                  int64_t ldb, float* out, const typename P::B* ahead) {
  __m512 acc[MB][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < k; i += P::kStep) {
    const typename P::Mask m = tail_mask<P>(k - i);
    decltype(P::load_b(b, m)) bv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) bv[j] = P::load_b(b + j * ldb + i, m);
    if (ahead != nullptr) {
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + j * ldb + i), _MM_HINT_T1);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      const auto av = P::load_a(a + r * lda + i, m);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[r][j] = P::madd(acc[r][j], av, bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) {
    if constexpr (NB == 4) {
      _mm_storeu_ps(out + r * 4, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {  // a 4-block column's own tree: see reduce4
      out[r * 4] = _mm_cvtss_f32(reduce4(acc[r][0], acc[r][0], acc[r][0], acc[r][0]));
    }
  }
}

// Rows n_begin..n_end of c [M, N] (ldc) for a [M, K] (lda) in P's a type and b [N, K] (ldb) in
// P's b type; c is float or BF16 (rounded once, from the fp32 sums).
constexpr int64_t kPrefetchBytes = 12 << 10;  // 6, 12 and 20 KB measured alike

template <typename P, int NB, typename T>
inline void column_block(const typename P::A* a, int64_t lda, int64_t rows, int64_t k,
                         const typename P::B* b, int64_t ldb, int64_t n, int64_t n_end, T* c,
                         int64_t ldc) {
  float out[6 * 4];
  const typename P::B* bn = b + n * ldb;
  // Only rows this call reads later (another thread's rows are its own to fetch); none for
  // K = 0 (ldb 0).
  const typename P::B* ahead = nullptr;
  const int64_t row_bytes = ldb * static_cast<int64_t>(sizeof(typename P::B));
  if (row_bytes > 0) {
    const int64_t dist = std::max<int64_t>(NB, (kPrefetchBytes + row_bytes - 1) / row_bytes);
    if (n + dist + NB <= n_end) ahead = bn + dist * ldb;
  }
  for (int64_t r0 = 0; r0 < rows;) {
    // Groups of 4 rows, but 5 or 6 left go in one pass (24 accumulators + 4 b + 1 a registers
    // of the 32): a verification window of 5-6 tokens reads each weight once, not twice. Each
    // (row, column) sum runs in the same order whatever its group, so results do not change.
    const int64_t left = rows - r0;
    const int64_t mb = left == 5 || left == 6 ? left : left < 4 ? left : 4;
    const typename P::A* ar = a + r0 * lda;
    const typename P::B* pf = r0 == 0 ? ahead : nullptr;  // later row groups find b cached
    if (mb == 6) {
      block<P, 6, NB>(ar, lda, k, bn, ldb, out, pf);
    } else if (mb == 5) {
      block<P, 5, NB>(ar, lda, k, bn, ldb, out, pf);
    } else if (mb == 4) {
      block<P, 4, NB>(ar, lda, k, bn, ldb, out, pf);
    } else if (mb == 3) {
      block<P, 3, NB>(ar, lda, k, bn, ldb, out, pf);
    } else if (mb == 2) {
      block<P, 2, NB>(ar, lda, k, bn, ldb, out, pf);
    } else {
      block<P, 1, NB>(ar, lda, k, bn, ldb, out, pf);
    }
    for (int64_t r = 0; r < mb; ++r) {
      for (int j = 0; j < NB; ++j) store(c + (r0 + r) * ldc + n + j, out[r * 4 + j]);
    }
    r0 += mb;
  }
}

template <typename P, typename T>
void kernel_rows(const typename P::A* a, int64_t lda, int64_t rows, int64_t k,
                 const typename P::B* b, int64_t ldb, int64_t n_begin, int64_t n_end, T* c,
                 int64_t ldc) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) column_block<P, 4>(a, lda, rows, k, b, ldb, n, n_end, c, ldc);
  for (; n < n_end; ++n) column_block<P, 1>(a, lda, rows, k, b, ldb, n, n_end, c, ldc);
}
