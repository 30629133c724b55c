// Handwritten tensor-core attention (sm_80 and newer) over a GQA / CLA-shared KV cache: raw
// mma.sync m16n8k16, ldmatrix and cp.async, fp32 softmax and accumulation, bf16 or fp16 in and
// out, head_dim 64 / 80 / 128. See attention.h for the contract.
//
// Two paths, picked from the shape alone (the host never reads kv_lens, so this is CUDA-graph
// capturable):
//   * Sq >= 64, prefill: flash_prefill.cuh. FlashAttention-2: 128 query rows of one head per block,
//     8 warps x 16 rows, 64-key K/V tiles through a 3-stage cp.async pipeline, online softmax in
//     registers, causal tile skipping and diagonal masking (bottom-right aligned per kv_lens[b]).
//   * Sq < 64, decode and verification: split_kv_decode.cuh. FlashDecoding: blocks take (key
//     range, KV head, batch) and all Hq/Hkv query heads x Sq rows of that KV head in the MMA's M,
//     so the cache is read once.
// When the grid of query blocks alone would not fill the GPU (small batch, long context), both
// split the keys into ranges: the number of ranges comes from the shape, kv_capacity and num_sms;
// which keys a range holds comes from the sequence's length, on the device (split_tiles), so a
// short context in a long cache still spreads over the splits. Each range writes fp32 partials
// and a log-sum-exp to the workspace and a combine kernel merges them; empty ranges write
// lse = -inf and zeros. The device code shared by both is in attention_common.cuh. The .cuh files
// are included here so that attention.cu stays the single translation unit of the build.
#include "attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "../common.h"
#include "attention_common.cuh"
#include "flash_prefill.cuh"
#include "split_kv_decode.cuh"

namespace pearlmoe::attention {
namespace {

constexpr int kPrefillMinQLen = 64;   // shorter query blocks take the split-KV path
constexpr int kMaxSplits = 128;       // bounds the workspace and the combine's loop
constexpr int kMinTilesPerSplit = 2;  // a split-KV range amortises its Q load and partial write
constexpr int kMinPrefillTilesPerSplit = 8;   // likewise for 128 query rows per block
constexpr int kBlocksPerSm = 2;               // split-KV target: ~2 blocks resident per SM
constexpr int64_t kMaxKv = int64_t{1} << 30;  // keys and query rows are int on the device

bool supported_head_dim(int d) { return d == 64 || d == 80 || d == 128; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The checks that need no pointer, for a non-empty problem.
bool shape_ok(const AttentionParams& p) {
  if (!supported_head_dim(p.head_dim)) return false;
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) return false;
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0) return false;
  if (p.kv_capacity < p.q_len || p.kv_capacity > kMaxKv || p.q_len > kMaxKv) return false;
  if (p.batch > 65535 || p.kv_heads > 65535) return false;  // grid.z, grid.y
  // Output rows B · Sq · Hq are indexed in int64 but counted in grid.x of the combine (4 a block).
  const int64_t rows = int64_t{p.batch} * p.q_len * p.q_heads;
  if (rows > int64_t{std::numeric_limits<int32_t>::max()}) return false;
  return true;
}

bool empty(const AttentionParams& p) { return p.batch == 0 || p.q_len == 0 || p.q_heads == 0; }

bool negative(const AttentionParams& p) {
  return p.batch < 0 || p.q_len < 0 || p.q_heads < 0 || p.kv_heads < 0 || p.kv_capacity < 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Key ranges for `blocks` prefill blocks on `sms` SMs. Prefill is bound by tensor-core throughput,
// which blocks sharing an SM share, so s ranges take ceil(blocks · s / sms) / s of the unsplit
// time: the fewest splits within 15% of the best up to max_splits (each split costs a partial
// write, its share of the combine and a pipeline start).
int64_t prefill_splits(int64_t blocks, int64_t sms, int64_t max_splits) {
  auto waves = [&](int64_t s) { return ceil_div(blocks * s, sms); };
  int64_t best = 1;  // minimises waves(s) / s
  for (int64_t s = 2; s <= max_splits; ++s) {
    if (waves(s) * best < waves(best) * s) best = s;
  }
  for (int64_t s = 1;; ++s) {
    if (waves(s) * best * 100 <= waves(best) * s * 115) return s;
  }
}

// Partials [splits, B, Sq, Hq, D] fp32, then lse [splits, B, Sq, Hq] fp32.
int64_t partial_floats(const AttentionParams& p, int splits) {
  return int64_t{splits} * p.batch * p.q_len * p.q_heads * p.head_dim;
}

size_t workspace_for(const AttentionParams& p, int splits) {
  if (splits == 1) return 0;
  const int64_t rows = int64_t{splits} * p.batch * p.q_len * p.q_heads;
  return static_cast<size_t>(partial_floats(p, splits) + rows) * sizeof(float);
}

AttentionPlan make_plan(const AttentionParams& p, int num_sms) {
  AttentionPlan plan{};
  const int64_t kv_tiles = std::max<int64_t>(ceil_div(p.kv_capacity, kKeyTile), 1);
  plan.prefill = p.q_len >= kPrefillMinQLen;
  plan.warps_m = 1;
  plan.m_groups = 1;
  if (plan.prefill) {
    const int64_t m_tiles = ceil_div(p.q_len, PrefillConfig<64>::kRows);
    const int64_t blocks = int64_t{p.q_heads} * m_tiles * p.batch;
    const int64_t sms = std::max(num_sms, 1);
    const int64_t max_splits =
        std::min<int64_t>({kMaxSplits, kv_tiles / kMinPrefillTilesPerSplit, 65535 / m_tiles});
    // Only a grid that leaves SMs idle splits: a long context at small batch and few heads.
    const int64_t splits =
        blocks < sms && max_splits > 1 ? prefill_splits(blocks, sms, max_splits) : 1;
    plan.splits = static_cast<int>(splits);
    plan.min_split_tiles = kMinPrefillTilesPerSplit;
    plan.grid[0] = static_cast<unsigned>(p.q_heads);
    plan.grid[1] = static_cast<unsigned>(m_tiles * splits);
    plan.grid[2] = static_cast<unsigned>(p.batch);
  } else {
    const int64_t m = int64_t{p.q_heads / p.kv_heads} * p.q_len;  // (row, head) pairs per KV head
    plan.warps_m = m <= 16 ? 1 : m <= 32 ? 2 : m <= 64 ? 4 : 8;
    plan.m_groups = static_cast<int>(ceil_div(m, 16 * plan.warps_m));
    // Enough splits that B · Hkv · row groups · splits fills ~kBlocksPerSm blocks per SM, none
    // shorter than kMinTilesPerSplit tiles of the capacity (the lengths are dealt out on the
    // device).
    const int64_t blocks = int64_t{p.batch} * p.kv_heads * plan.m_groups;
    const int64_t target = int64_t{kBlocksPerSm} * std::max(num_sms, 1);
    const int64_t splits =
        std::min<int64_t>({ceil_div(target, blocks), kMaxSplits, kv_tiles / kMinTilesPerSplit});
    plan.splits = static_cast<int>(std::max<int64_t>(splits, 1));
    plan.min_split_tiles = kMinTilesPerSplit;
    plan.grid[0] = static_cast<unsigned>(int64_t{plan.m_groups} * plan.splits);
    plan.grid[1] = static_cast<unsigned>(p.kv_heads);
    plan.grid[2] = static_cast<unsigned>(p.batch);
  }
  plan.workspace_bytes = workspace_for(p, plan.splits);
  return plan;
}

template <class Kernel>
cudaError_t set_smem(Kernel* kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  // Not a stream operation: legal during CUDA-graph capture.
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int D>
cudaError_t launch_combine(const KernelArgs& a, int splits, cudaStream_t stream) {
  const int64_t rows = int64_t{a.batch} * a.q_len * a.q_heads;
  return launch_kernel(&split_kv_combine_kernel<T, D>, static_cast<unsigned>(ceil_div(rows, 4)),
                       128, 0, stream, a.partial, a.lse, static_cast<T*>(a.o), rows, splits);
}

template <typename T, int D>
cudaError_t launch_prefill(const KernelArgs& a, const AttentionPlan& plan, cudaStream_t stream) {
  using Cfg = PrefillConfig<D>;
  if (plan.grid[1] > 65535) return cudaErrorInvalidValue;
  auto* kernel = &flash_prefill_kernel<T, D>;
  PM_CUDA_TRY(set_smem(kernel, Cfg::kSmemBytes));
  const dim3 grid(plan.grid[0], plan.grid[1], plan.grid[2]);
  PM_CUDA_TRY(launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, a));
  return plan.splits == 1 ? cudaSuccess : launch_combine<T, D>(a, plan.splits, stream);
}

template <typename T, int D, int kWarpsM, int kWarpsK>
cudaError_t launch_split_kv(const KernelArgs& a, const AttentionPlan& plan, cudaStream_t stream) {
  using Cfg = DecodeConfig<D, kWarpsM, kWarpsK>;
  auto* kernel = &split_kv_kernel<T, D, kWarpsM, kWarpsK>;
  PM_CUDA_TRY(set_smem(kernel, Cfg::kSmemBytes));
  const dim3 grid(plan.grid[0], plan.grid[1], plan.grid[2]);
  PM_CUDA_TRY(launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, a));
  return plan.splits == 1 ? cudaSuccess : launch_combine<T, D>(a, plan.splits, stream);
}

template <typename T, int D>
cudaError_t dispatch(const KernelArgs& a, const AttentionPlan& plan, cudaStream_t stream) {
  if (plan.prefill) return launch_prefill<T, D>(a, plan, stream);
  switch (plan.warps_m) {
    case 1:
      return launch_split_kv<T, D, 1, 4>(a, plan, stream);
    case 2:
      return launch_split_kv<T, D, 2, 2>(a, plan, stream);
    case 4:
      return launch_split_kv<T, D, 4, 1>(a, plan, stream);
    default:
      return launch_split_kv<T, D, 8, 1>(a, plan, stream);
  }
}

template <typename T>
cudaError_t dispatch_head_dim(const KernelArgs& a, const AttentionPlan& plan, int head_dim,
                              cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return dispatch<T, 64>(a, plan, stream);
    case 80:
      return dispatch<T, 80>(a, plan, stream);
    case 128:
      return dispatch<T, 128>(a, plan, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

AttentionPlan attention_plan(const AttentionParams& p, int num_sms) {
  if (negative(p) || empty(p) || !shape_ok(p)) return AttentionPlan{};
  return make_plan(p, num_sms);
}

size_t attention_workspace_bytes(const AttentionParams& p, int num_sms) {
  return attention_plan(p, num_sms).workspace_bytes;
}

cudaError_t attention_cuda(const AttentionParams& p, void* workspace, size_t workspace_bytes_,
                           int num_sms, cudaStream_t stream) {
  if (negative(p) || !supported_head_dim(p.head_dim)) return cudaErrorInvalidValue;
  if (empty(p)) return cudaSuccess;  // nothing to write
  if (!shape_ok(p)) return cudaErrorInvalidValue;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.o == nullptr ||
      p.kv_lens == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.o) ||
      reinterpret_cast<uintptr_t>(p.kv_lens) % alignof(int32_t) != 0) {
    return cudaErrorInvalidValue;
  }
  // 16-byte rows: the stride of every dimension longer than 1 a multiple of 8 elements (a size-1
  // dimension's stride only ever multiplies index 0, so views may carry any).
  const std::pair<int64_t, int64_t> strides[] = {
      {p.q_batch_stride, p.batch},      {p.q_row_stride, p.q_len},
      {p.q_head_stride, p.q_heads},     {p.kv_batch_stride, p.batch},
      {p.kv_row_stride, p.kv_capacity}, {p.kv_head_stride, p.kv_heads}};
  for (const auto& [stride, size] : strides) {
    if (size > 1 && stride % 8 != 0) return cudaErrorInvalidValue;
  }

  const AttentionPlan plan = make_plan(p, num_sms);
  const size_t need = plan.workspace_bytes;
  if (need > 0 && (workspace == nullptr || !aligned16(workspace) || workspace_bytes_ < need)) {
    return cudaErrorInvalidValue;
  }

  KernelArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.o = p.o;
  a.kv_lens = p.kv_lens;
  a.q_batch_stride = p.q_batch_stride;
  a.q_row_stride = p.q_row_stride;
  a.q_head_stride = p.q_head_stride;
  a.kv_batch_stride = p.kv_batch_stride;
  a.kv_row_stride = p.kv_row_stride;
  a.kv_head_stride = p.kv_head_stride;
  a.batch = p.batch;
  a.q_len = p.q_len;
  a.q_heads = p.q_heads;
  a.kv_heads = p.kv_heads;
  a.group = p.q_heads / p.kv_heads;
  a.kv_capacity = static_cast<int>(p.kv_capacity);
  a.scale_log2 = p.scale * kLog2e;
  a.splits = plan.splits;
  a.min_split_tiles = plan.min_split_tiles;
  a.m_groups = plan.m_groups;
  if (need > 0) {
    a.partial = static_cast<float*>(workspace);
    a.lse = a.partial + partial_floats(p, plan.splits);
  }

  switch (p.dtype) {
    case DType::kBF16:
      return dispatch_head_dim<__nv_bfloat16>(a, plan, p.head_dim, stream);
    case DType::kFP16:
      return dispatch_head_dim<__half>(a, plan, p.head_dim, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pearlmoe::attention
