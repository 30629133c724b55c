// Device pieces shared by the prefill and split-KV kernels of attention.cu (the only file that
// includes this header): the padded shared-memory tile layout, the K/V tile loader
// and the per-warp online-softmax attention step on mma.sync m16n8k16.
//
// Fragment conventions (PTX ISA, mma.m16n8k16 with 16-bit inputs; g = lane / 4, t = lane % 4):
//   A 16x16 row-major: a0 = (row g, cols 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..),
//                      a3 = (g + 8, 2t + 8..)
//   B 16x8 ("col"):    b0 = (k 2t..2t+1, n g), b1 = (k 2t + 8..2t + 9, n g)
//   C 16x8 fp32:       c0, c1 = (row g, cols 2t, 2t + 1), c2, c3 = (row g + 8, same cols)
// so the S = Q·K^T accumulator of two adjacent n8 key tiles is, element for element, the A operand
// of P·V over those 16 keys (FlashAttention-2 keeps P in registers this way).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../launch.cuh"
#include "../ptx.cuh"

namespace pearlmoe::attention {
namespace {

using ptx::cp_async_16, ptx::cp_async_commit, ptx::cp_async_wait, ptx::ex2, ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans, ptx::mma_16816, ptx::smem_u32;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;

// One pipeline stage of either kernel holds a K tile and then a V tile of kKeyTile keys.

// ------------------------------------------------------------------------------------------------
// Two floats as a packed pair of T: lo in the low half (the lower column of a fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// ------------------------------------------------------------------------------------------------
// Shared-memory tiles of head_dim-wide rows.
//
// A row is D/8 16-byte chunks padded to D/8 + 1 (odd) chunks. One ldmatrix phase reads the same
// logical chunk of 8 consecutive rows; with an odd row pitch those land in 8 distinct 16-byte bank
// groups, for every head_dim (an XOR swizzle needs a power-of-two chunk count, and 80 gives 10).
// Costs 1/(D/8) extra shared memory.
template <int D>
struct RowTile {
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16 (k16 steps, n8 pairs)");
  static constexpr int kChunks = D / 8;
  static constexpr int kPitchChunks = kChunks + 1;
  static constexpr int kPitchBytes = 16 * kPitchChunks;
  static_assert(kPitchChunks % 2 == 1, "");

  __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>(16 * (row * kPitchChunks + chunk));
  }
};

// Bytes of one pipeline stage: a K tile then a V tile of kKeyTile rows each.
template <int D>
constexpr int kStageBytes = 2 * kKeyTile * RowTile<D>::kPitchBytes;

// ------------------------------------------------------------------------------------------------
// Global -> shared copies of one K/V tile (kKeyTile keys of one KV head), all threads of the block.
//
// Keys at or past key_end are zero-filled, never read: beyond kv_lens[b] the cache may hold stale
// bits (even NaN), and a masked probability of 0 times a NaN V would still poison the output.
template <typename T, int D, int kThreads>
struct KvTileLoader {
  using Tile = RowTile<D>;
  static constexpr int kItems = kKeyTile * Tile::kChunks;  // 16-byte chunks per K (or V) tile
  static constexpr int kIters = (kItems + kThreads - 1) / kThreads;

  const T* k;      // key 0 of this (batch, KV head); also the dummy address of zero-fills
  const T* v;      // likewise for V
  int64_t stride;  // elements between consecutive keys
  int key_end;     // keys >= key_end are zero-filled

  // Tile of keys [n0, n0 + kKeyTile) into the stage at shared address `stage`. The loop stays
  // rolled: unrolled, ptxas hoists every iteration's 64-bit offset out of the main loop, which
  // cost up to 54 registers per thread; the copies are asynchronous, so issue order hardly matters.
  __device__ __forceinline__ void load(uint32_t stage, int n0) const {
    constexpr uint32_t kVOffset = kKeyTile * Tile::kPitchBytes;
#pragma unroll 1
    for (int it = 0; it < kIters; ++it) {
      const int idx = static_cast<int>(threadIdx.x) + it * kThreads;
      if (kItems % kThreads != 0 && idx >= kItems) break;
      const int row = idx / Tile::kChunks;
      const int chunk = idx % Tile::kChunks;
      const int key = n0 + row;
      const bool ok = key < key_end;
      const int64_t off = ok ? key * stride + chunk * 8 : 0;
      const uint32_t dst = stage + Tile::offset(row, chunk);
      cp_async_16(dst, k + off, ok);
      cp_async_16(dst + kVOffset, v + off, ok);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// One warp's share of flash attention: 16 query rows (Q fragments held in registers) against NT
// n8 tiles of keys per step, with the running max / sum / output of the online softmax in fp32.
//
// Scores live in the log2 domain: s2 = (q·k) · scale · log2(e), so p = 2^(s2 - m). m is the
// running max (-inf until a visible key is seen); the exponent uses m_use = (m == -inf ? 0 : m),
// so a row that has seen only masked keys gets p = 2^(-inf) = 0 instead of 2^(-inf + inf) = NaN,
// and its rescale factor 2^(m_old - m_use) is 0 or 1, never NaN.
template <typename T, int D, int NT>
struct WarpAttention {
  using Tile = RowTile<D>;
  static constexpr int KQ = D / 16;  // k16 steps of Q·K^T
  static constexpr int NO = D / 8;   // n8 tiles of the output
  static_assert(NT % 2 == 0, "keys per warp step come in k16 pairs of n8 tiles");

  uint32_t qf[KQ][4];  // A fragments of Q, k16 step kk
  float o[NO][4];      // C fragments of the unnormalised output, n8 tile of head_dim
  float m[2];          // running max of rows g, g + 8 (log2 domain)
  float l[2];          // running sum of p, this thread's columns only (quad-reduced in finish)

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int n = 0; n < NO; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m[h] = kNegInf;
      l[h] = 0.0f;
    }
  }

  // Q rows [row0, row0 + 16) of the tile at shared address sq.
  __device__ __forceinline__ void load_q(uint32_t sq, int row0) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
      // Matrices: rows 0-7 | 8-15 at chunk 2kk, then at chunk 2kk + 1 = a0, a1, a2, a3.
      ldmatrix_x4(qf[kk], sq + Tile::offset(row0 + (lane & 15), 2 * kk + (lane >> 4)));
    }
  }

  // One step over keys at tile rows [krow0, krow0 + 8 NT) of the K tile at sk and the V tile at
  // sv; key0 is the sequence position of tile row krow0. kMask: key j is visible to this thread's
  // row h only if j < lim[h].
  template <bool kMask>
  __device__ __forceinline__ void step(uint32_t sk, uint32_t sv, int krow0, int key0,
                                       const int (&lim)[2], float scale_log2) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
    }

    // S = Q·K^T. K is stored [key][d], which is B's "col" layout: one x4 gives (keys 8j.., d chunk
    // 2kk), (same keys, 2kk + 1), (keys 8(j+1).., 2kk), (.., 2kk + 1) = b0, b1 of tiles j, j + 1.
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        uint32_t r[4];
        const int row = krow0 + 16 * p + 8 * (lane >> 4) + (lane & 7);
        ldmatrix_x4(r, sk + Tile::offset(row, 2 * kk + ((lane >> 3) & 1)));
        mma_16816<T>(s[2 * p], qf[kk], r[0], r[1]);
        mma_16816<T>(s[2 * p + 1], qf[kk], r[2], r[3]);
      }
    }

    // Scale, mask, row max over this step (a row's 8 NT columns sit in the 4 lanes of a quad).
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * scale_log2;
        if constexpr (kMask) {
          const int key = key0 + 8 * j + 2 * (lane & 3) + (e & 1);
          if (key >= lim[e >> 1]) x = kNegInf;
        }
        s[j][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float m_use[2];
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(kFullMask, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(kFullMask, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      m_use[h] = m_new == kNegInf ? 0.0f : m_new;
      alpha[h] = ex2(m[h] - m_use[h]);  // 0 while m[h] is -inf, else <= 1
      m[h] = m_new;
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = ex2(s[j][e] - m_use[e >> 1]);
        s[j][e] = p;
        sum[e >> 1] += p;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + sum[h];
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // O += P·V over 16 keys per k step. P's A fragment is S of tiles 2kk, 2kk + 1 (see top).
    // V is stored [key][d]; the transposed x4 gives (keys 0-7, d chunk 2dp), (keys 8-15, 2dp),
    // (keys 0-7, 2dp + 1), (keys 8-15, 2dp + 1) = b0, b1 of output tiles 2dp, 2dp + 1.
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int row = krow0 + 16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7);
#pragma unroll
      for (int dp = 0; dp < NO / 2; ++dp) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, sv + Tile::offset(row, 2 * dp + (lane >> 4)));
        mma_16816<T>(o[2 * dp], a, r[0], r[1]);
        mma_16816<T>(o[2 * dp + 1], a, r[2], r[3]);
      }
    }
  }

  // Completes the row sums across the quad. Afterwards l[h] is the row's full sum.
  __device__ __forceinline__ void finish() {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(kFullMask, l[h], 1);
      l[h] += __shfl_xor_sync(kFullMask, l[h], 2);
    }
  }
};

// Kernel arguments of both attention kernels (element strides; see attention.h).
struct KernelArgs {
  const void* q;           // [B, Sq, Hq, D]
  const void* k;           // [B, kv_capacity, Hkv, D]
  const void* v;           // [B, kv_capacity, Hkv, D]
  void* o;                 // [B, Sq, Hq, D] contiguous
  const int32_t* kv_lens;  // [B]
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t kv_batch_stride, kv_row_stride, kv_head_stride;
  int batch, q_len, q_heads, kv_heads;
  int group;            // q_heads / kv_heads
  int kv_capacity;      // host-checked to fit in int
  float scale_log2;     // scale · log2(e)
  int splits;           // key ranges per query block (split_tiles: from kv_lens, on the device)
  int min_split_tiles;  // split_tiles' min_tiles
  int m_groups;         // split-KV: blocks along the (query row, head) dimension
  float* partial;       // [splits, B, Sq, Hq, D] fp32 split outputs, or nullptr: write o directly
  float* lse;           // [splits, B, Sq, Hq] log2-domain log-sum-exp of each split
};

// kv_lens[b] clamped into [0, kv_capacity], so bad lengths cannot read out of bounds.
__device__ __forceinline__ int load_kv_len(const KernelArgs& a, int b) {
  return min(max(__ldg(a.kv_lens + b), 0), a.kv_capacity);
}

}  // namespace
}  // namespace pearlmoe::attention
