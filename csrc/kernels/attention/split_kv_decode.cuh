// Split-KV (FlashDecoding) kernels for short query blocks (decode, speculative verification);
// included only by attention.cu.
//
// The GQA group is packed into the MMA's M dimension: for KV head hk the block's "rows" are the
// M = group · Sq pairs r = i · group + hg (query row i, query head hk · group + hg), so every K/V
// tile is read from HBM once and used by all the query heads that share it, for all Sq rows.
// Tensor cores (mma.sync) rather than fp32 FMA: M is 10 for Hunyuan decode and up to 90 for
// verification, i.e. up to ~M FLOP per cache byte, which fp32 FMA cannot keep up with at HBM
// speed on H100 (67 TFLOP/s FMA vs 3.35 TB/s); tensor cores make the kernel purely bandwidth-bound.
//
// Block = (key range `split`, row group `mg`) x KV head x batch. The grid is fixed by the shape;
// the block's keys are the split-th of the ranges split_tiles deals out from the keys its rows
// actually need (from kv_lens, on the device), so short contexts keep fewer, fuller splits busy.
// Warps form kWarpsM x kWarpsK: warp (wm, wk) owns rows [16 wm, +16) of the row group and keys [wk
// · 64 / kWarpsK, +64 / kWarpsK) of every 64-key tile, with its own online-softmax state; the
// kWarpsK partial states of a row are merged through shared memory at the end. Small M uses the
// warps along the keys (1 x 4: decode), large M along the rows (8 x 1, 128 rows); M > 128 takes
// several row groups (K/V then comes from L2 for the second and later groups, which run alongside
// the first).
//
// K/V tiles stream through a 3-stage cp.async pipeline of 16-byte copies from all threads (two
// tiles, 36-70 KB, in flight per block while one is consumed). Keys past the split's end or the
// row group's last causal limit are zero-filled and masked. Each split writes fp32 normalised
// partial outputs and the log2-domain log-sum-exp per (b, i, h); a split with no visible keys for
// a row writes lse = -inf and zeros. With one split the kernel writes o directly, no combine.
#pragma once

#include "attention_common.cuh"

namespace pearlmoe::attention {
namespace {

template <int D, int kWarpsM_, int kWarpsK_>
struct DecodeConfig {
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsK = kWarpsK_;
  static constexpr int kWarps = kWarpsM * kWarpsK;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarpsM;               // (row, head) pairs per block
  static constexpr int kKeysPerWarp = kKeyTile / kWarpsK;  // per tile
  static constexpr int NT = kKeysPerWarp / 8;
  static constexpr int kStages = 3;
  static constexpr int kPipeBytes = kStages * kStageBytes<D>;
  static constexpr int kMergePitch =
      D + 8;  // floats; = 8 mod 32 words: float2 stores conflict-free
  static constexpr int kMergeBytes = kWarps * 16 * kMergePitch * 4;
  static constexpr int kUnionBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
  static constexpr int kQBytes = kRows * RowTile<D>::kPitchBytes;
  static constexpr int kStatBytes = 2 * kWarps * 16 * 4;
  static constexpr int kSmemBytes = kUnionBytes + kQBytes + kStatBytes;
  static_assert(kKeysPerWarp >= 16, "P·V needs k16 steps");
};

template <typename T, int D, int kWarpsM, int kWarpsK>
__global__ void __launch_bounds__(DecodeConfig<D, kWarpsM, kWarpsK>::kThreads, 1)
    split_kv_kernel(const KernelArgs a) {
  using Cfg = DecodeConfig<D, kWarpsM, kWarpsK>;
  using Tile = RowTile<D>;
  constexpr int kStages = Cfg::kStages;

  const int mg = static_cast<int>(blockIdx.x) % a.m_groups;
  const int split = static_cast<int>(blockIdx.x) / a.m_groups;
  const int hk = static_cast<int>(blockIdx.y);
  const int b = static_cast<int>(blockIdx.z);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int wm = warp / kWarpsK;
  const int wk = warp % kWarpsK;
  const int sq = a.q_len;
  const int group = a.group;
  const int m_rows = group * sq;   // M
  const int r0 = mg * Cfg::kRows;  // first row of the block
  const int r_end = min(r0 + Cfg::kRows, m_rows);

  // Keys of this split: [c0, key_end), its share of the keys up to the causal limit of the block's
  // last query row.
  const int kv_len = load_kv_len(a, b);
  const int diag = kv_len - sq;                             // row i sees keys j < diag + i + 1
  const int rows_key_end = diag + (r_end - 1) / group + 1;  // <= kv_len
  int t_begin, t_end;
  split_tiles(rows_key_end, split, a.splits, a.min_split_tiles, &t_begin, &t_end);
  const int c0 = t_begin * kKeyTile;
  const int key_end = min(t_end * kKeyTile, rows_key_end);
  const int n_tiles = t_end - t_begin;

  PM_DYNAMIC_SMEM(uint8_t, smem);
  const uint32_t s0 = smem_u32(smem);
  const auto stage = [&](int s) { return s0 + static_cast<uint32_t>(s * kStageBytes<D>); };
  const uint32_t sq_tile = s0 + Cfg::kUnionBytes;
  float* stat_m = reinterpret_cast<float*>(smem + Cfg::kUnionBytes + Cfg::kQBytes);  // [warp][16]
  float* stat_l = stat_m + Cfg::kWarps * 16;                                         // [warp][16]

  const T* q = static_cast<const T*>(a.q) + b * a.q_batch_stride;
  const int64_t kv_off = b * a.kv_batch_stride + hk * a.kv_head_stride;
  const KvTileLoader<T, D, Cfg::kThreads> loader{static_cast<const T*>(a.k) + kv_off,
                                                 static_cast<const T*>(a.v) + kv_off,
                                                 a.kv_row_stride, key_end};

  // Q rows of the block; rows past M are zero.
  {
    constexpr int kItems = Cfg::kRows * Tile::kChunks;
    constexpr int kIters = (kItems + Cfg::kThreads - 1) / Cfg::kThreads;
    const T* q_head0 = q + static_cast<int64_t>(hk) * group * a.q_head_stride;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = static_cast<int>(threadIdx.x) + it * Cfg::kThreads;
      if (kItems % Cfg::kThreads != 0 && idx >= kItems) break;
      const int row = idx / Tile::kChunks;
      const int chunk = idx % Tile::kChunks;
      const int r = r0 + row;
      const bool ok = r < m_rows;
      const int i = r / group;
      const int hg = r - i * group;
      const T* src = ok ? q_head0 + i * a.q_row_stride + hg * a.q_head_stride + chunk * 8 : q_head0;
      cp_async_16(sq_tile + Tile::offset(row, chunk), src, ok);
    }
  }
  // Prologue: Q joins tile 0 in group 0; KV tile t lives in stage t % kStages.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) loader.load(stage(s), c0 + s * kKeyTile);
    cp_async_commit();
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();

  WarpAttention<T, D, Cfg::NT> att;
  att.init();
  att.load_q(sq_tile, 16 * wm);

  // Causal limits of this thread's rows g and g + 8; rows past M see nothing.
  int lim[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = r0 + 16 * wm + (lane >> 2) + 8 * hh;
    lim[hh] = r < m_rows ? diag + r / group + 1 : 0;
  }
  const int warp_key_end = __reduce_max_sync(kFullMask, max(lim[0], lim[1]));
  const int kw0 = wk * Cfg::kKeysPerWarp;  // this warp's first row within a tile
  const float scale_log2 = a.scale_log2;

  for (int t = 0; t < n_tiles; ++t) {
    const int next = t + kStages - 1;
    if (next < n_tiles) loader.load(stage(next % kStages), c0 + next * kKeyTile);
    cp_async_commit();

    const int n0 = c0 + t * kKeyTile;
    if (n0 + kw0 < warp_key_end) {  // warp-uniform; the step masks per row and key
      const uint32_t sk = stage(t % kStages);
      att.template step<true>(sk, sk + kKeyTile * Tile::kPitchBytes, kw0, n0 + kw0, lim,
                              scale_log2);
    }
    cp_async_wait<kStages - 2>();
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();  // the merge buffer below overlays the pipeline stages

  // Merge the kWarpsK key slices of each row: global max M*, sum L* = Σ_k l_k 2^(m_k - M*), and
  // each slice's output scaled by 2^(m_k - M*) / L* then summed. m_k = -inf (slice saw no key)
  // weighs 2^(-inf) = 0; L* = 0 (row saw no key) gives lse -inf and a zero output.
  att.finish();
  if ((lane & 3) == 0) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      stat_m[warp * 16 + (lane >> 2) + 8 * hh] = att.m[hh];
      stat_l[warp * 16 + (lane >> 2) + 8 * hh] = att.l[hh];
    }
  }
  __syncthreads();
  float* merge = reinterpret_cast<float*>(smem);  // [warp][16][kMergePitch]
  const bool to_workspace = a.partial != nullptr;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row16 = (lane >> 2) + 8 * hh;
    float m_max = kNegInf;
#pragma unroll
    for (int k = 0; k < kWarpsK; ++k) m_max = fmaxf(m_max, stat_m[(wm * kWarpsK + k) * 16 + row16]);
    const float m_use = m_max == kNegInf ? 0.0f : m_max;
    float l_sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarpsK; ++k) {
      const int w = (wm * kWarpsK + k) * 16 + row16;
      l_sum += stat_l[w] * ex2(stat_m[w] - m_use);
    }
    const float f = l_sum > 0.0f ? ex2(att.m[hh] - m_use) / l_sum : 0.0f;
    float* dst = merge + (warp * 16 + row16) * Cfg::kMergePitch + 2 * (lane & 3);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<float2*>(dst + 8 * n) =
          make_float2(att.o[n][2 * hh] * f, att.o[n][2 * hh + 1] * f);
    }
    const int r = r0 + 16 * wm + row16;
    if (to_workspace && wk == 0 && (lane & 3) == 0 && r < m_rows) {
      const int i = r / group;
      const int h = hk * group + (r - i * group);
      const int64_t orow = ((static_cast<int64_t>(split) * a.batch + b) * sq + i) * a.q_heads + h;
      a.lse[orow] = l_sum > 0.0f ? m_use + log2f(l_sum) : kNegInf;
    }
  }
  __syncthreads();

  // Sum the slices and store 4 consecutive head_dim elements per item: fp32 partials to the
  // workspace, or o itself when there is a single split.
  constexpr int kQuads = D / 4;
  constexpr int kItems = Cfg::kRows * kQuads;
  for (int idx = static_cast<int>(threadIdx.x); idx < kItems; idx += Cfg::kThreads) {
    const int row = idx / kQuads;
    const int quad = idx % kQuads;
    const int r = r0 + row;
    if (r >= m_rows) continue;
    const float* src = merge + ((row / 16) * kWarpsK * 16 + row % 16) * Cfg::kMergePitch + 4 * quad;
    float4 acc = *reinterpret_cast<const float4*>(src);
#pragma unroll
    for (int k = 1; k < kWarpsK; ++k) {
      const float4 x = *reinterpret_cast<const float4*>(src + k * 16 * Cfg::kMergePitch);
      acc.x += x.x;
      acc.y += x.y;
      acc.z += x.z;
      acc.w += x.w;
    }
    const int i = r / group;
    const int h = hk * group + (r - i * group);
    if (to_workspace) {
      const int64_t orow = ((static_cast<int64_t>(split) * a.batch + b) * sq + i) * a.q_heads + h;
      *reinterpret_cast<float4*>(a.partial + orow * D + 4 * quad) = acc;
    } else {
      const int64_t orow = (static_cast<int64_t>(b) * sq + i) * a.q_heads + h;
      const uint2 val = make_uint2(pack2<T>(acc.x, acc.y), pack2<T>(acc.z, acc.w));
      *reinterpret_cast<uint2*>(static_cast<T*>(a.o) + orow * D + 4 * quad) = val;
    }
  }
}

// Combine: one warp per output row (b, i, h); lane d4 owns head_dim elements [4 d4, 4 d4 + 4).
// o = Σ_s 2^(lse_s - max) · partial_s / Σ_s 2^(lse_s - max). Splits with lse -inf weigh 0 (and
// their partials are zeros); a row whose splits all are -inf (saw no key) gets zeros.
template <typename T, int D>
__global__ void __launch_bounds__(128)
    split_kv_combine_kernel(const float* __restrict__ partial,  // [splits, rows, D]
                            const float* __restrict__ lse,      // [splits, rows]
                            T* __restrict__ o,                  // [rows, D]; rows = B · Sq · Hq
                            int64_t rows, int splits) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (row >= rows) return;  // warp-uniform

  float m_max = kNegInf;
  for (int s = lane; s < splits; s += 32) m_max = fmaxf(m_max, lse[s * rows + row]);
#pragma unroll
  for (int d = 16; d >= 1; d >>= 1) m_max = fmaxf(m_max, __shfl_xor_sync(kFullMask, m_max, d));

  constexpr int kQuads = D / 4;
  static_assert(kQuads <= 32, "");
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (m_max != kNegInf) {
    float w_sum = 0.0f;
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
      const float w = ex2(lse[s * rows + row] - m_max);  // warp-uniform
      w_sum += w;
      if (lane < kQuads && w > 0.0f) {
        const float4 x =
            *reinterpret_cast<const float4*>(partial + (s * rows + row) * D + 4 * lane);
        acc.x += w * x.x;
        acc.y += w * x.y;
        acc.z += w * x.z;
        acc.w += w * x.w;
      }
    }
    const float inv = 1.0f / w_sum;  // w_sum >= 1: the largest split weighs 1
    acc.x *= inv;
    acc.y *= inv;
    acc.z *= inv;
    acc.w *= inv;
  }
  if (lane < kQuads) {
    *reinterpret_cast<uint2*>(o + row * D + 4 * lane) =
        make_uint2(pack2<T>(acc.x, acc.y), pack2<T>(acc.z, acc.w));
  }
}

}  // namespace
}  // namespace pearlmoe::attention
