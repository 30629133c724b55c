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

namespace pearlmoe::attention {

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

// Scratch for split-KV (long contexts at small batch): fp32 partial outputs and log-sum-exps.
size_t attention_workspace_bytes(const AttentionParams& p, int num_sms);

// Picks the tiling from the shape: a flash-attention kernel for long query blocks (prefill), and
// for short ones (decode, verification) a split-KV kernel whose blocks each take a KV chunk and
// all query heads of one KV head, followed by a combine pass.
cudaError_t attention_cuda(const AttentionParams& p, void* workspace, size_t workspace_bytes,
                           int num_sms, cudaStream_t stream);

}  // namespace pearlmoe::attention
