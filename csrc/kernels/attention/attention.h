// Torch-free attention kernels over a compressed (GQA, CLA-shared) KV cache. Device pointers;
// enqueue on `stream`; never synchronise; return the launch error.
//
// For batch b, query head h (KV head h / (Hq / Hkv)), query row i < Sq:
//     o[b, i, h, :] = softmax_j( scale · q[b, i, h, :] · k[b, j, h_kv, :] ) · v[b, j, h_kv, :]
// over keys j < kv_lens[b] - Sq + i + 1 (causal, aligned bottom-right), which serves prefill
// (Sq = prompt), decode (Sq = 1) and speculative verification (Sq = draft length + 1) alike.
// Softmax and accumulation in fp32; q, k, v, o in bf16 or fp16. Valid lengths are
// Sq <= kv_lens[b] <= kv_capacity (every query sees a key). The host never reads kv_lens (no sync;
// CUDA-graph capturable); the kernels clamp each into [0, kv_capacity], so no value reads out of
// bounds, and a query row that then sees no key comes out as zeros.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common.h"

namespace pearlmoe::attention {

constexpr int kKeyTile = 64;  // keys per K/V tile in both kernels

enum class DType { kBF16, kFP16 };

struct AttentionParams {
  const void* q;                                           // [B, Sq, Hq, D]; element strides below
  const void* k;                                           // [B, kv_capacity, Hkv, D]
  const void* v;                                           // [B, kv_capacity, Hkv, D]
  void* o;                                                 // [B, Sq, Hq, D] contiguous
  const int32_t* kv_lens;                                  // [B] device
  int64_t q_batch_stride, q_row_stride, q_head_stride;     // head dim contiguous; strides of
                                                           // dims > 1 multiples of 8
  int64_t kv_batch_stride, kv_row_stride, kv_head_stride;  // same strides for k and v
  int batch, q_len, q_heads, kv_heads, head_dim;           // head_dim in {64, 80, 128}
  int64_t kv_capacity;
  float scale;
  DType dtype;
};

// How attention_cuda runs a problem: a flash-attention kernel for long query blocks (prefill),
// and for short ones (decode, verification) a split-KV kernel whose blocks take all query heads of
// one KV head; both split the keys into `splits` ranges when the grid would not fill the GPU,
// followed by a combine pass. Fixed by the shapes and the SM count, never by kv_lens, so a CUDA
// graph's grid is right for any lengths: each block finds its key range on the device with
// split_tiles() from its sequence's actual length.
struct AttentionPlan {
  bool prefill;         // flash-prefill kernel (Sq >= 64), else split-KV
  int splits;           // key ranges per query block (1: no workspace, no combine)
  int warps_m;          // split-KV: warps along the (row, head) pairs: 1, 2, 4 or 8
  int m_groups;         // split-KV: row groups of 16 warps_m pairs
  int min_split_tiles;  // a busy split takes at least this many key tiles
  unsigned grid[3];     // the main kernel's grid
  size_t workspace_bytes;
};

// The plan for a valid, non-empty problem (attention_cuda's checks); all zeros otherwise.
AttentionPlan attention_plan(const AttentionParams& p, int num_sms);

// Scratch for the split paths: fp32 partial outputs and log-sum-exps (the plan's).
size_t attention_workspace_bytes(const AttentionParams& p, int num_sms);

cudaError_t attention_cuda(const AttentionParams& p, void* workspace, size_t workspace_bytes,
                           int num_sms, cudaStream_t stream);

// Key tiles [*begin, *end) of split `split` (of `splits`) for a block whose rows need keys
// [0, key_end): the tiles are dealt out evenly over as many splits as give each at least
// min_tiles, so a short context keeps fewer splits busy and leaves the rest empty (they then
// contribute nothing).
PM_HD void split_tiles(int key_end, int split, int splits, int min_tiles, int* begin, int* end) {
  const int tiles = key_end > 0 ? (key_end + kKeyTile - 1) / kKeyTile : 0;
  const int fit = tiles / min_tiles;
  const int used = fit < 1 ? 1 : (fit < splits ? fit : splits);
  const int base = tiles / used, extra = tiles % used;  // the first `extra` splits take one more
  if (split >= used) {
    *begin = *end = tiles;
    return;
  }
  *begin = split * base + (split < extra ? split : extra);
  *end = *begin + base + (split < extra ? 1 : 0);
}

}  // namespace pearlmoe::attention
