// Handwritten tensor-core attention (sm_80 and newer) over a GQA / CLA-shared KV cache: raw
// mma.sync m16n8k16, ldmatrix and cp.async, fp32 softmax and accumulation, bf16 or fp16 in and
// out, head_dim 64 / 80 / 128. See attention.h for the contract.
//
// Two paths, picked from the shape alone (the host never reads kv_lens, so this is CUDA-graph
// capturable):
//   * Sq >= 64, prefill: flash_prefill.cuh. FlashAttention-2: 128 query rows of one head per block,
//     8 warps x 16 rows, 64-key K/V tiles through a 3-stage cp.async pipeline, online softmax in
//     registers, causal tile skipping and diagonal masking (bottom-right aligned per kv_lens[b]).
//   * Sq < 64, decode and verification: split_kv_decode.cuh. FlashDecoding: blocks take (KV chunk,
//     KV head, batch) and all Hq/Hkv query heads x Sq rows of that KV head in the MMA's M, so the
//     cache is read once; each split writes fp32 partials and a log-sum-exp to the workspace and a
//     combine kernel merges them. The split count fills the GPU at small batch from kv_capacity
//     and num_sms; splits past a sequence's causal limit write lse = -inf and zeros.
// The device code shared by both is in attention_common.cuh. The .cuh files are included here so
// that attention.cu stays the single translation unit of the build.
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
constexpr int kMinTilesPerSplit = 2;  // a split amortises its Q load and partial write over >= 2
constexpr int kBlocksPerSm = 2;       // split-KV target: ~2 blocks resident per SM
constexpr int64_t kMaxKv = int64_t{1} << 30;  // keys and query rows are int on the device

struct Plan {
  bool prefill = false;
  // Split-KV only.
  int warps_m = 1;   // warps along the rows: 1, 2, 4 or 8 (x 4, 2, 1, 1 along the keys)
  int m_groups = 1;  // row groups of 16 warps_m (row, head) pairs
  int splits = 1;
  int chunk = 0;  // keys per split
};

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

Plan make_plan(const AttentionParams& p, int num_sms) {
  Plan plan;
  plan.prefill = p.q_len >= kPrefillMinQLen;
  if (plan.prefill) return plan;
  const int64_t m = int64_t{p.q_heads / p.kv_heads} * p.q_len;  // (row, head) pairs per KV head
  plan.warps_m = m <= 16 ? 1 : m <= 32 ? 2 : m <= 64 ? 4 : 8;
  plan.m_groups = static_cast<int>(ceil_div(m, 16 * plan.warps_m));
  // Enough splits that B · Hkv · row groups · splits fills ~kBlocksPerSm blocks per SM, but no
  // split shorter than kMinTilesPerSplit tiles of kv_capacity (actual lengths are unknown here;
  // splits past a sequence's length exit after writing -inf).
  const int64_t base = int64_t{p.batch} * p.kv_heads * plan.m_groups;
  const int64_t kv_tiles = std::max<int64_t>(ceil_div(p.kv_capacity, kKeyTile), 1);
  const int64_t target = int64_t{kBlocksPerSm} * std::max(num_sms, 1);
  int64_t splits = ceil_div(target, base);
  splits = std::min<int64_t>({splits, kMaxSplits, ceil_div(kv_tiles, kMinTilesPerSplit)});
  splits = std::max<int64_t>(splits, 1);
  const int64_t tiles_per_split = ceil_div(kv_tiles, splits);
  plan.splits = static_cast<int>(ceil_div(kv_tiles, tiles_per_split));  // no empty tail splits
  plan.chunk = static_cast<int>(tiles_per_split * kKeyTile);
  return plan;
}

// Workspace layout: partial [splits, B, Sq, Hq, D] fp32, then lse [splits, B, Sq, Hq] fp32.
int64_t partial_floats(const AttentionParams& p, const Plan& plan) {
  return int64_t{plan.splits} * p.batch * p.q_len * p.q_heads * p.head_dim;
}

size_t workspace_bytes(const AttentionParams& p, const Plan& plan) {
  if (plan.prefill || plan.splits == 1) return 0;
  const int64_t rows = int64_t{plan.splits} * p.batch * p.q_len * p.q_heads;
  return static_cast<size_t>(partial_floats(p, plan) + rows) * sizeof(float);
}

template <class Kernel>
cudaError_t set_smem(Kernel* kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  // Not a stream operation: legal during CUDA-graph capture.
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int D>
cudaError_t launch_prefill(const KernelArgs& a, cudaStream_t stream) {
  using Cfg = PrefillConfig<D>;
  const int64_t m_tiles = ceil_div(a.q_len, Cfg::kRows);
  if (m_tiles > 65535) return cudaErrorInvalidValue;
  auto* kernel = &flash_prefill_kernel<T, D>;
  PM_CUDA_TRY(set_smem(kernel, Cfg::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(a.q_heads), static_cast<unsigned>(m_tiles),
                  static_cast<unsigned>(a.batch));
  return launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, a);
}

template <typename T, int D, int kWarpsM, int kWarpsK>
cudaError_t launch_split_kv(const KernelArgs& a, const Plan& plan, cudaStream_t stream) {
  using Cfg = DecodeConfig<D, kWarpsM, kWarpsK>;
  auto* kernel = &split_kv_kernel<T, D, kWarpsM, kWarpsK>;
  PM_CUDA_TRY(set_smem(kernel, Cfg::kSmemBytes));
  const int64_t blocks_x = int64_t{plan.m_groups} * plan.splits;
  if (blocks_x > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(a.kv_heads),
                  static_cast<unsigned>(a.batch));
  PM_CUDA_TRY(launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, a));
  if (plan.splits == 1) return cudaSuccess;
  const int64_t rows = int64_t{a.batch} * a.q_len * a.q_heads;
  return launch_kernel(&split_kv_combine_kernel<T, D>, static_cast<unsigned>(ceil_div(rows, 4)),
                       128, 0, stream, a.partial, a.lse, static_cast<T*>(a.o), rows, plan.splits);
}

template <typename T, int D>
cudaError_t dispatch(const KernelArgs& a, const Plan& plan, cudaStream_t stream) {
  if (plan.prefill) return launch_prefill<T, D>(a, stream);
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
cudaError_t dispatch_head_dim(const KernelArgs& a, const Plan& plan, int head_dim,
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

size_t attention_workspace_bytes(const AttentionParams& p, int num_sms) {
  if (negative(p) || empty(p) || !shape_ok(p)) return 0;
  return workspace_bytes(p, make_plan(p, num_sms));
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

  const Plan plan = make_plan(p, num_sms);
  const size_t need = workspace_bytes(p, plan);
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
  a.chunk = plan.chunk;
  a.m_groups = plan.m_groups;
  if (need > 0) {
    a.partial = static_cast<float*>(workspace);
    a.lse = a.partial + partial_floats(p, plan);
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
