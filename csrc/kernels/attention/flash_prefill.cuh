// FlashAttention-2 style prefill kernel (long query blocks); included only by attention.cu.
//
// Block = 128 query rows of one query head, 8 warps of 16 rows each; grid (x = query head,
// y = row tile (heaviest first) x key range, z = batch). With one key range per row tile (the
// usual case) a block writes o; with more (a long context whose grid would not fill the GPU) each
// block takes the range split_tiles deals out from kv_lens on the device and writes fp32 partials
// and log-sum-exps for split_kv_combine_kernel, as the split-KV path does. One head per block
// rather than the GQA group packed into M: rows of one head share one causal limit per row, the K/V
// tile in shared memory is reused by 8 warps, and the Hq / Hkv heads that read the same K/V are
// adjacent in x, so they run together and take it from L2 (prefill is bound by tensor-core
// throughput, not by HBM).
//
// Pipeline: kStages stages of (K tile, V tile), 64 keys each, filled by cp.async with exactly one
// commit per step, as in the grouped GEMM. The Q tile (128 rows) has exactly the size of a stage
// and is staged in the last one, read into registers before the loop refills it.
//
// Causality: a block stops after the KV tile holding the last visible key of its last valid row; a
// warp skips tiles entirely past its own last row and masks only tiles that cross the diagonal of
// its first row. The output goes through shared memory for 16-byte coalesced stores.
#pragma once

#include "attention_common.cuh"

namespace pearlmoe::attention {
namespace {

template <int D>
struct PrefillConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;  // query rows per block
  static constexpr int kStages = 3;
  // A warp takes a tile in steps of kKeysPerStep keys: the S fragments of 32 keys (16 registers)
  // rather than 64 keep D <= 80 under the 128 registers of 2 blocks per SM.
  static constexpr int kKeysPerStep = D <= 80 ? 32 : 64;
  static constexpr int NT = kKeysPerStep / 8;
  static constexpr int kSmemBytes = kStages * kStageBytes<D>;
  static constexpr int kMinBlocks = D <= 80 ? 2 : 1;  // __launch_bounds__: <= 128 registers at 2
  static_assert(kRows * RowTile<D>::kPitchBytes <= kStageBytes<D>, "Q tile must fit one stage");
};

template <typename T, int D>
__global__ void __launch_bounds__(PrefillConfig<D>::kThreads, PrefillConfig<D>::kMinBlocks)
    flash_prefill_kernel(const KernelArgs a) {
  using Cfg = PrefillConfig<D>;
  using Tile = RowTile<D>;
  constexpr int kStages = Cfg::kStages;

  const int h = static_cast<int>(blockIdx.x);
  const int split = static_cast<int>(blockIdx.y) % a.splits;
  const int m_tiles = static_cast<int>(gridDim.y) / a.splits;
  const int m0 = (m_tiles - 1 - static_cast<int>(blockIdx.y) / a.splits) * Cfg::kRows;  // longest
  const int b = static_cast<int>(blockIdx.z);
  const int hk = h / a.group;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int sq = a.q_len;

  // Query row i sees keys j < diag + i + 1; this block takes key tiles [t0, t0 + n_tiles).
  const int kv_len = load_kv_len(a, b);
  const int diag = kv_len - sq;
  const int n_end = diag + min(m0 + Cfg::kRows, sq);  // <= kv_len: keys the block's rows need
  int t0, t_end;
  split_tiles(n_end, split, a.splits, a.min_split_tiles, &t0, &t_end);
  const int n_tiles = t_end - t0;

  PM_DYNAMIC_SMEM(uint8_t, smem);
  const uint32_t s0 = smem_u32(smem);
  const auto stage = [&](int s) { return s0 + static_cast<uint32_t>(s * kStageBytes<D>); };

  const T* q = static_cast<const T*>(a.q) + b * a.q_batch_stride + h * a.q_head_stride;
  const int64_t kv_off = b * a.kv_batch_stride + hk * a.kv_head_stride;
  const KvTileLoader<T, D, Cfg::kThreads> loader{static_cast<const T*>(a.k) + kv_off,
                                                 static_cast<const T*>(a.v) + kv_off,
                                                 a.kv_row_stride, n_end};

  // Q rows [m0, m0 + 128) into the last stage; rows past Sq are zero.
  {
    constexpr int kItems = Cfg::kRows * Tile::kChunks;
    static_assert(kItems % Cfg::kThreads == 0, "");
    const uint32_t sq_tile = stage(kStages - 1);
#pragma unroll
    for (int it = 0; it < kItems / Cfg::kThreads; ++it) {
      const int idx = static_cast<int>(threadIdx.x) + it * Cfg::kThreads;
      const int row = idx / Tile::kChunks;
      const int chunk = idx % Tile::kChunks;
      const int i = m0 + row;
      const bool ok = i < sq;
      cp_async_16(sq_tile + Tile::offset(row, chunk), ok ? q + i * a.q_row_stride + chunk * 8 : q,
                  ok);
    }
  }
  // Prologue: Q joins tile 0 in group 0; KV tile t lives in stage t % kStages.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) loader.load(stage(s), (t0 + s) * kKeyTile);
    cp_async_commit();
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();

  WarpAttention<T, D, Cfg::NT> att;
  att.init();
  att.load_q(stage(kStages - 1), 16 * warp);
  __syncthreads();  // the last stage is refilled in step 0

  const int row_lo = m0 + 16 * warp;  // this warp's first query row
  int lim[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) lim[hh] = diag + row_lo + (lane >> 2) + 8 * hh + 1;
  const int warp_key_end = row_lo < sq ? diag + min(row_lo + 16, sq) : 0;  // <= n_end
  const int mask_from = diag + row_lo + 1;  // keys >= this are hidden from some row of the warp
  const float scale_log2 = a.scale_log2;

  for (int t = 0; t < n_tiles; ++t) {
    // Refill the stage computed in step t - 1 (the barrier ending that step made it free).
    const int next = t + kStages - 1;
    if (next < n_tiles) loader.load(stage(next % kStages), (t0 + next) * kKeyTile);
    cp_async_commit();

    const uint32_t sk = stage(t % kStages);
    const uint32_t sv = sk + kKeyTile * Tile::kPitchBytes;
#pragma unroll
    for (int sub = 0; sub < kKeyTile / Cfg::kKeysPerStep; ++sub) {
      const int krow0 = sub * Cfg::kKeysPerStep;
      const int n0 = (t0 + t) * kKeyTile + krow0;
      if (n0 < warp_key_end) {  // warp-uniform
        if (n0 + Cfg::kKeysPerStep > mask_from) {
          att.template step<true>(sk, sv, krow0, n0, lim, scale_log2);
        } else {
          att.template step<false>(sk, sv, krow0, n0, lim, scale_log2);
        }
      }
    }
    cp_async_wait<kStages - 2>();  // KV tile t + 1 has landed (this thread's copies)
    __syncthreads();               // ... everyone's, and stage t % kStages is free
  }
  cp_async_wait<0>();  // only empty groups remain; leave nothing in flight

  // Epilogue. Rows that saw no key (an empty key range, invalid kv_lens) come out as zeros.
  att.finish();
  float inv[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) inv[hh] = att.l[hh] > 0.0f ? 1.0f / att.l[hh] : 0.0f;
  if (a.partial != nullptr) {  // a key range of several: normalised fp32 partials and lse
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int i = row_lo + (lane >> 2) + 8 * hh;
      if (i >= sq) continue;
      const int64_t orow = ((static_cast<int64_t>(split) * a.batch + b) * sq + i) * a.q_heads + h;
      float* dst = a.partial + orow * D + 2 * (lane & 3);
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<float2*>(dst + 8 * n) =
            make_float2(att.o[n][2 * hh] * inv[hh], att.o[n][2 * hh + 1] * inv[hh]);
      }
      if ((lane & 3) == 0) a.lse[orow] = att.l[hh] > 0.0f ? att.m[hh] + log2f(att.l[hh]) : kNegInf;
    }
    return;
  }
  // Every warp is past its last shared-memory read (the last barrier above), so each warp stages
  // its normalised 16 x D rows in rows [16 warp, +16) of stage 0, then stores them as 16-byte
  // chunks.
  uint8_t* so = smem;  // stage 0, generic address
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = 16 * warp + (lane >> 2) + 8 * hh;
      *reinterpret_cast<uint32_t*>(so + Tile::offset(row, n) + 4 * (lane & 3)) =
          pack2<T>(att.o[n][2 * hh] * inv[hh], att.o[n][2 * hh + 1] * inv[hh]);
    }
  }
  __syncwarp();
  T* o = static_cast<T*>(a.o);
  constexpr int kOutItems = 16 * Tile::kChunks;
  static_assert(kOutItems % 32 == 0, "");
#pragma unroll
  for (int it = 0; it < kOutItems / 32; ++it) {
    const int idx = lane + 32 * it;
    const int r = idx / Tile::kChunks;
    const int chunk = idx % Tile::kChunks;
    const int i = row_lo + r;
    if (i < sq) {
      const uint4 val = *reinterpret_cast<const uint4*>(so + Tile::offset(16 * warp + r, chunk));
      const int64_t orow = (static_cast<int64_t>(b) * sq + i) * a.q_heads + h;
      *reinterpret_cast<uint4*>(o + orow * D + chunk * 8) = val;
    }
  }
}

}  // namespace
}  // namespace pearlmoe::attention
