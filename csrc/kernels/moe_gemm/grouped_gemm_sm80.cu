// Handwritten tensor-core grouped GEMM (sm_80 and newer): raw mma.sync m16n8k16, ldmatrix and
// cp.async, fp32 accumulation, bf16 or fp16 in and out. See grouped_gemm.h for the contract.
//
// Design:
//   * Grid: x = m-tile slot, y = n-tile. Group g owns ceil(rows_g / BM) consecutive slots; each
//     block finds its group from group_offsets on the device (find_tile), so the host never learns
//     group sizes (CUDA-graph capturable). grid.x is an upper bound on the slot count and blocks
//     past the last tile exit at once. m varies fastest so that the m-tiles that share one B tile
//     run together and B, the larger operand in MoE, comes from HBM about once.
//   * Main loop: a kStages-deep cp.async pipeline of 16-byte chunks, zero-filled where the row
//     (group end, N edge) or the K column is out of range; XOR-swizzled shared memory so ldmatrix
//     is bank-conflict free; mma.sync with fp32 accumulators in registers.
//   * SwiGLU: the B tile stacks BN/2 gate rows over the BN/2 matching up rows, so every thread
//     holds gate and up accumulators for the same outputs and the epilogue needs no shared memory.
//   * Two tiles: decode (BM 16, BN 64, BK 128, 4 warps side by side in N) when there are few rows
//     per group and the kernel is bound by streaming B; prefill (128 x 128 x 32, 8 warps)
//     otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../common.h"
#include "../launch.cuh"
#include "../ptx.cuh"
#include "grouped_gemm.h"

namespace pearlmoe::moe_gemm {
namespace {

using ptx::cp_async_16, ptx::cp_async_commit, ptx::cp_async_wait, ptx::ldmatrix_x4;
using ptx::mma_16816, ptx::smem_u32;

constexpr unsigned kFullMask = 0xffffffffu;

// Sizes are passed to the kernel as int; the margin keeps `x + tile` from overflowing.
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max() - 1024;

template <int BM_, int BN_, int BK_, int kWarpsM_, int kWarpsN_, int kStages_, int kMinBlocks_>
struct TileConfig {
  static constexpr int BM = BM_;  // problem rows per block
  static constexpr int BN = BN_;  // B rows per block (gate and up rows together for SwiGLU)
  static constexpr int BK = BK_;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__ occupancy target

  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int WM = BM / kWarpsM;  // warp tile
  static constexpr int WN = BN / kWarpsN;
  static constexpr int MI = WM / 16;                       // m16 fragments per warp
  static constexpr int NI = WN / 8;                        // n8 fragments per warp
  static constexpr int kChunks = BK / 8;                   // 16-byte chunks per tile row
  static constexpr int kALoads = BM * kChunks / kThreads;  // cp.async per thread per stage
  static constexpr int kBLoads = BN * kChunks / kThreads;
  static constexpr int kStageBytesA = BM * BK * 2;
  static constexpr int kStageBytesB = BN * BK * 2;
  static constexpr int kSmemBytes = kStages * (kStageBytesA + kStageBytesB);

  static_assert(WM % 16 == 0 && WN % 16 == 0, "NI must be even: B fragments load in pairs");
  static_assert(BK % 16 == 0 && (kChunks == 4 || kChunks % 8 == 0), "see swizzle()");
  static_assert(kThreads % kChunks == 0, "a thread's chunk column must not change between copies");
  static_assert(kALoads >= 1 && kALoads * kThreads == BM * kChunks, "A copies must divide evenly");
  static_assert(kBLoads >= 1 && kBLoads * kThreads == BN * kChunks, "B copies must divide evenly");
  static_assert(kBLoads <= 32 && kALoads <= 32, "row masks are 32-bit");
  static_assert(kStages >= 2, "");
};

// Decode: 16 rows (a whole group at decode) against 64 B rows; 4 warps each own 16 B rows. 20 KiB
// per stage, 16 KiB of it B, so 4 stages keep ~48 KiB of B in flight per block.
using DecodeTile = TileConfig<16, 64, 128, 1, 4, 4, 2>;
// Prefill: the classic sm80 128 x 128 x 32 tile, 8 warps of 64 x 32, 4 stages (64 KiB).
using PrefillTile = TileConfig<128, 128, 32, 2, 4, 4, 2>;

// ------------------------------------------------------------------------------------------------
// Epilogue helpers (the PTX wrappers are in ../ptx.cuh).

// Stores two adjacent outputs (dst is 4-byte aligned).
template <typename T>
__device__ __forceinline__ void store2(T* dst, float x, float y) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x, y);
  } else {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(x, y);
  }
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Index of 16-byte chunk `chunk` of row `row` in a tile with kChunks chunks per row. One ldmatrix
// phase reads one logical chunk of 8 consecutive rows (first row a multiple of 8); the XOR puts
// those 8 reads in 8 distinct 16-byte bank groups. Rows of >= 128 bytes XOR with row % 8; 64-byte
// rows share a 128-byte line in pairs and XOR with (row / 2) % 4.
template <int kChunks>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  if constexpr (kChunks == 4) {
    return row * 4 + (chunk ^ ((row >> 1) & 3));
  } else {
    return row * kChunks + (chunk ^ (row & 7));
  }
}

// ------------------------------------------------------------------------------------------------
// Tile -> group mapping.

struct TileCoord {
  int group;      // -1: the slot lies past the last tile
  int row_begin;  // first problem row of this tile
  int row_end;    // one past the group's last row
};

// Rows [begin, end) of group g, clamped into [0, m] so bad offsets cannot write out of bounds.
__device__ __forceinline__ void group_rows(const int32_t* __restrict__ offs, int g, int m,
                                           int& begin, int& end) {
  begin = min(max(offs[g], 0), m);
  end = max(begin, min(offs[g + 1], m));
}

// Maps m-tile slot `slot` to (group, rows). Groups own consecutive runs of ceil(rows_g / BM)
// slots, so this is a search in the prefix sum of those counts: each lane sums the counts of a
// contiguous run of ceil(G / 32) groups (independent loads, about one trip to L2), a warp scan
// finds the lane whose run holds the slot, and that lane walks its run. Every warp computes the
// same answer from the same memory, so no shared memory or barrier is needed. Warp-uniform result.
template <int BM>
__device__ TileCoord find_tile(const int32_t* __restrict__ offs, int num_groups, int m, int slot) {
  const int lane = threadIdx.x & 31;
  const int per_lane = (num_groups + 31) / 32;
  const int g_first = min(lane * per_lane, num_groups);
  const int g_last = min(g_first + per_lane, num_groups);
  int tiles = 0;
  for (int g = g_first; g < g_last; ++g) {
    int begin, end;
    group_rows(offs, g, m, begin, end);
    tiles += (end - begin + BM - 1) / BM;
  }
  int tiles_incl = tiles;  // inclusive scan over lanes
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(kFullMask, tiles_incl, d);
    if (lane >= d) tiles_incl += v;
  }
  const int tiles_excl = tiles_incl - tiles;
  // At most one lane's half-open range [excl, incl) holds the slot; empty runs hold nothing.
  const unsigned owner_mask = __ballot_sync(kFullMask, slot >= tiles_excl && slot < tiles_incl);
  if (owner_mask == 0) return {-1, 0, 0};
  const int owner = __ffs(owner_mask) - 1;

  TileCoord t{-1, 0, 0};
  if (lane == owner) {
    int first_slot = tiles_excl;
    for (int g = g_first; g < g_last; ++g) {
      int begin, end;
      group_rows(offs, g, m, begin, end);
      const int n_tiles = (end - begin + BM - 1) / BM;
      if (slot < first_slot + n_tiles) {
        t = {g, begin + (slot - first_slot) * BM, end};
        break;
      }
      first_slot += n_tiles;
    }
  }
  t.group = __shfl_sync(kFullMask, t.group, owner);
  t.row_begin = __shfl_sync(kFullMask, t.row_begin, owner);
  t.row_end = __shfl_sync(kFullMask, t.row_end, owner);
  return t;
}

// ------------------------------------------------------------------------------------------------
// Global -> shared copies of one pipeline stage.
//
// Thread tid copies 16-byte chunk tid % kChunks of tile rows tid / kChunks + i * kRowStep (A: i <
// kALoads, B: i < kBLoads), so its rows and column are fixed and only the K offset moves. Rows
// outside the group / N range and chunks past K are zero-filled.
template <class Cfg, typename T, bool kSwiGLU>
struct StageLoader {
  static constexpr int kRowStep = Cfg::kThreads / Cfg::kChunks;

  const T* a_src[Cfg::kALoads];  // start of each copy's A row (a valid address when masked off)
  const T* b_src[Cfg::kBLoads];  // start of each copy's B row (likewise)
  uint32_t a_ok = 0;             // bit i: copy i's row exists
  uint32_t b_ok = 0;
  int row0;   // first tile row of this thread
  int chunk;  // this thread's 16-byte chunk within a BK-wide tile row
  int k;

  // a: [rows of A, K] (row stride lda); b_group: [N, K], this group's B; n0: first output column
  // of the block (of the n_out-wide output; SwiGLU: n_out = N/2).
  __device__ StageLoader(const T* a, int64_t lda, const int32_t* __restrict__ a_rows,
                         const T* b_group, const TileCoord& tile, int n0, int n_out, int k_)
      : row0(static_cast<int>(threadIdx.x) / Cfg::kChunks),
        chunk(static_cast<int>(threadIdx.x) % Cfg::kChunks),
        k(k_) {
#pragma unroll
    for (int i = 0; i < Cfg::kALoads; ++i) {
      const int r = tile.row_begin + row0 + i * kRowStep;  // problem row
      a_src[i] = a;
      if (r < tile.row_end) {
        const int64_t src_row = a_rows != nullptr ? a_rows[r] : r;
        a_src[i] = a + src_row * lda;
        a_ok |= 1u << i;
      }
    }
#pragma unroll
    for (int i = 0; i < Cfg::kBLoads; ++i) {
      const int s = row0 + i * kRowStep;  // tile row
      int out_col, b_row;                 // output column this row feeds, row of B[g]
      if constexpr (kSwiGLU) {
        constexpr int kHalf = Cfg::BN / 2;
        const bool up = s >= kHalf;
        out_col = n0 + (up ? s - kHalf : s);
        b_row = up ? n_out + out_col : out_col;
      } else {
        out_col = n0 + s;
        b_row = out_col;
      }
      b_src[i] = b_group;
      if (out_col < n_out) {
        b_src[i] = b_group + static_cast<int64_t>(b_row) * k_;
        b_ok |= 1u << i;
      }
    }
  }

  // Issues the copies of K tile `k_tile` into the stage at shared addresses sa (A) and sb (B).
  __device__ __forceinline__ void load(uint32_t sa, uint32_t sb, int k_tile) const {
    const int kcol = k_tile * Cfg::BK + chunk * 8;
    const bool k_ok = kcol < k;  // k % 8 == 0: a chunk is wholly in or out
#pragma unroll
    for (int i = 0; i < Cfg::kALoads; ++i) {
      const bool ok = k_ok && ((a_ok >> i) & 1u);
      const uint32_t dst = sa + 16 * swizzle<Cfg::kChunks>(row0 + i * kRowStep, chunk);
      cp_async_16(dst, ok ? a_src[i] + kcol : a_src[i], ok);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kBLoads; ++i) {
      const bool ok = k_ok && ((b_ok >> i) & 1u);
      const uint32_t dst = sb + 16 * swizzle<Cfg::kChunks>(row0 + i * kRowStep, chunk);
      cp_async_16(dst, ok ? b_src[i] + kcol : b_src[i], ok);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Per-warp MMA over shared-memory stages and the epilogue.
//
// Warp (wm, wn) owns tile rows [wm*WM, +WM) and NI n8 fragments of B rows. kNone: fragment j is B
// rows wn*WN + 8j. SwiGLU: fragments j < NI/2 are gate rows wn*WN/2 + 8j and fragment j + NI/2 the
// matching up rows BN/2 + wn*WN/2 + 8j, so acc[.][j] and acc[.][j + NI/2] pair element by element.
template <class Cfg, typename T, bool kSwiGLU>
struct WarpMma {
  static constexpr int MI = Cfg::MI;
  static constexpr int NI = Cfg::NI;
  static constexpr int kOutFrags = kSwiGLU ? NI / 2 : NI;  // fragments that produce outputs
  static constexpr int kOutWarpCols = kOutFrags * 8;       // output columns per warp

  float acc[MI][NI][4];  // C fragment: rows lane/4 (+8), columns 2*(lane%4) (+1)
  int wm, wn, lane;

  __device__ WarpMma() {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    wm = warp / Cfg::kWarpsN;
    wn = warp % Cfg::kWarpsN;
    lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int j = 0; j < NI; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][j][e] = 0.0f;
      }
    }
  }

  // First B tile row of n8 fragment j (j may be a runtime value here).
  __device__ __forceinline__ int b_frag_row(int j) const {
    if constexpr (kSwiGLU) {
      constexpr int kHalfFrags = NI / 2;
      const int base = wn * kOutWarpCols;
      return j < kHalfFrags ? base + 8 * j : Cfg::BN / 2 + base + 8 * (j - kHalfFrags);
    } else {
      return wn * Cfg::WN + 8 * j;
    }
  }

  // acc += A stage (at shared address sa) * B stage (at sb)^T over BK.
  __device__ __forceinline__ void compute(uint32_t sa, uint32_t sb) {
    // ldmatrix row addresses: A x4 = rows 0-15 x k 0-7, then rows 0-15 x k 8-15 (the a0..a3
    // order of the mma); B x4 = fragment 2p (k 0-7, k 8-15) then fragment 2p+1.
    const int a_row = wm * Cfg::WM + (lane & 15);
    const int a_hi = lane >> 4;
    const int b_hi = (lane >> 3) & 1;
#pragma unroll
    for (int kk = 0; kk < Cfg::BK / 16; ++kk) {
      uint32_t af[MI][4];
      uint32_t bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        ldmatrix_x4(af[mi], sa + 16 * swizzle<Cfg::kChunks>(a_row + 16 * mi, 2 * kk + a_hi));
      }
#pragma unroll
      for (int p = 0; p < NI / 2; ++p) {
        uint32_t r[4];
        const int row = b_frag_row(2 * p + (lane >> 4)) + (lane & 7);
        ldmatrix_x4(r, sb + 16 * swizzle<Cfg::kChunks>(row, 2 * kk + b_hi));
        bf[2 * p][0] = r[0];
        bf[2 * p][1] = r[1];
        bf[2 * p + 1][0] = r[2];
        bf[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_16816<T>(acc[mi][j], af[mi], bf[j][0], bf[j][1]);
      }
    }
  }

  // c: [M, n_out] row-major. Writes rows [row_begin, row_end) of the tile, columns < n_out.
  __device__ __forceinline__ void store(T* __restrict__ c, const TileCoord& tile, int n0,
                                        int n_out) const {
    const int col0 = n0 + wn * kOutWarpCols + 2 * (lane & 3);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // fragment rows lane/4 and lane/4 + 8
        const int row = tile.row_begin + wm * Cfg::WM + 16 * mi + 8 * h + (lane >> 2);
        if (row >= tile.row_end) continue;
        T* c_row = c + static_cast<int64_t>(row) * n_out;
#pragma unroll
        for (int j = 0; j < kOutFrags; ++j) {
          const int col = col0 + 8 * j;  // even, and n_out % 4 == 0, so col + 1 < n_out too
          if (col >= n_out) continue;
          float x = acc[mi][j][2 * h];
          float y = acc[mi][j][2 * h + 1];
          if constexpr (kSwiGLU) {
            x = silu(x) * acc[mi][j + NI / 2][2 * h];
            y = silu(y) * acc[mi][j + NI / 2][2 * h + 1];
          }
          store2<T>(c_row + col, x, y);
        }
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// The kernel: block (blockIdx.x = m-tile slot, blockIdx.y = n-tile).

template <class Cfg, typename T, bool kSwiGLU>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    grouped_gemm_kernel(const T* __restrict__ a,  // [rows of A, K], row stride lda
                        int64_t lda,
                        const int32_t* __restrict__ a_rows,  // [M] or nullptr
                        const T* __restrict__ b,             // [G, N, K]
                        const int32_t* __restrict__ offs,    // [G + 1]
                        T* __restrict__ c,                   // [M, N] or [M, N/2] (SwiGLU)
                        int m, int n, int k, int num_groups) {
  const TileCoord tile = find_tile<Cfg::BM>(offs, num_groups, m, static_cast<int>(blockIdx.x));
  if (tile.group < 0) return;

  constexpr int kOutCols = kSwiGLU ? Cfg::BN / 2 : Cfg::BN;  // output columns per block
  const int n_out = kSwiGLU ? n / 2 : n;
  const int n0 = static_cast<int>(blockIdx.y) * kOutCols;

  PM_DYNAMIC_SMEM(uint8_t, smem);
  const uint32_t sa0 = smem_u32(smem);                          // [kStages][BM][BK], swizzled
  const uint32_t sb0 = sa0 + Cfg::kStages * Cfg::kStageBytesA;  // [kStages][BN][BK], swizzled

  const T* b_group = b + static_cast<int64_t>(tile.group) * n * k;
  const StageLoader<Cfg, T, kSwiGLU> loader(a, lda, a_rows, b_group, tile, n0, n_out, k);
  WarpMma<Cfg, T, kSwiGLU> warp_mma;

  // Pipeline: K tile t lives in stage t % kStages. Exactly one commit per step (possibly empty)
  // keeps the wait_group count meaning "K tile t has landed".
  const int k_tiles = (k + Cfg::BK - 1) / Cfg::BK;
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < k_tiles) loader.load(sa0 + s * Cfg::kStageBytesA, sb0 + s * Cfg::kStageBytesB, s);
    cp_async_commit();
  }
  cp_async_wait<Cfg::kStages - 2>();
  __syncthreads();

  for (int t = 0; t < k_tiles; ++t) {
    // Refill the stage computed in step t - 1 (the barrier ending that step made it free).
    const int next = t + Cfg::kStages - 1;
    if (next < k_tiles) {
      const int s = next % Cfg::kStages;
      loader.load(sa0 + s * Cfg::kStageBytesA, sb0 + s * Cfg::kStageBytesB, next);
    }
    cp_async_commit();
    const int s = t % Cfg::kStages;
    warp_mma.compute(sa0 + s * Cfg::kStageBytesA, sb0 + s * Cfg::kStageBytesB);
    cp_async_wait<Cfg::kStages - 2>();  // K tile t + 1 has landed (this thread's copies)
    __syncthreads();                    // ... everyone's, and stage t % kStages is free
  }
  cp_async_wait<0>();  // only empty groups remain; leave nothing in flight at exit

  warp_mma.store(c, tile, n0, n_out);
}

// ------------------------------------------------------------------------------------------------
// Host side.

template <class Cfg, typename T, bool kSwiGLU>
cudaError_t launch(const GroupedGemmParams& p, cudaStream_t stream) {
  constexpr int kOutCols = kSwiGLU ? Cfg::BN / 2 : Cfg::BN;
  const int64_t n_out = kSwiGLU ? p.n / 2 : p.n;
  const int64_t n_tiles = (n_out + kOutCols - 1) / kOutCols;
  // Tiles Σ_g ceil(rows_g / BM) <= ceil(m / BM) + G - 1 (each nonempty group pads < 1 tile), and
  // <= m since every tile holds a row.
  const int64_t m_slots = std::min<int64_t>((p.m + Cfg::BM - 1) / Cfg::BM + p.num_groups - 1, p.m);
  if (n_tiles > 65535) return cudaErrorInvalidValue;

  auto* kernel = &grouped_gemm_kernel<Cfg, T, kSwiGLU>;
  if constexpr (Cfg::kSmemBytes > 48 * 1024) {
    // Not a stream operation: legal during CUDA-graph capture.
    PM_CUDA_TRY(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  }
  const dim3 grid(static_cast<unsigned>(m_slots), static_cast<unsigned>(n_tiles));
  return launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream,
                       static_cast<const T*>(p.a), p.lda, p.a_rows, static_cast<const T*>(p.b),
                       p.group_offsets, static_cast<T*>(p.c), static_cast<int>(p.m),
                       static_cast<int>(p.n), static_cast<int>(p.k), p.num_groups);
}

template <typename T>
cudaError_t dispatch_tile(const GroupedGemmParams& p, cudaStream_t stream) {
  const bool decode = p.m <= kDecodeMaxRowsPerGroup * p.num_groups;
  const bool swiglu = p.epilogue == Epilogue::kSwiGLU;
  if (decode) {
    return swiglu ? launch<DecodeTile, T, true>(p, stream)
                  : launch<DecodeTile, T, false>(p, stream);
  }
  return swiglu ? launch<PrefillTile, T, true>(p, stream)
                : launch<PrefillTile, T, false>(p, stream);
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace

cudaError_t grouped_gemm_sm80(const GroupedGemmParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.num_groups < 0 || p.lda < 0) return cudaErrorInvalidValue;
  if (p.m > kMaxDim || p.n > kMaxDim || p.k > kMaxDim) return cudaErrorInvalidValue;
  if (p.n % 8 != 0 || p.k % 8 != 0) return cudaErrorInvalidValue;  // 16-byte rows
  if (p.epilogue == Epilogue::kSwiGLU && p.n % 2 != 0) return cudaErrorInvalidValue;
  if (p.m == 0 || p.n == 0 || p.num_groups == 0) return cudaSuccess;  // nothing to write
  // Empty tensors may carry null pointers, so these are checked only where they are read or
  // written (with k == 0 the kernel only writes zeros to C).
  if (p.c == nullptr || p.group_offsets == nullptr) return cudaErrorInvalidValue;
  if (p.k > 0 && (p.a == nullptr || p.b == nullptr)) return cudaErrorInvalidValue;
  if (!aligned(p.a, 16) || !aligned(p.b, 16) || p.lda % 8 != 0 || !aligned(p.c, 4)) {
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case DType::kBF16:
      return dispatch_tile<__nv_bfloat16>(p, stream);
    case DType::kFP16:
      return dispatch_tile<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pearlmoe::moe_gemm
