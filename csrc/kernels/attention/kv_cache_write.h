// Torch-free KV-cache append: the new tokens' keys and values go to their positions in the cache
// (index writes on the device, so a decode step needs no host work and captures in a CUDA graph).
//
//   k_cache[b, positions[b, s], h, :] = k[b, s, h, :]   (and v likewise)
// for b < B, s < S, h < Hkv. A position outside [0, capacity) is skipped: the kernel never
// writes out of bounds whatever the positions hold (the CPU launcher rejects them instead).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pearlmoe::attention {

struct KvWriteParams {
  void* k_cache;  // [B, capacity, Hkv, D] (one cache group), element strides below
  void* v_cache;
  const void* k;  // [B, S, Hkv, D], element strides below
  const void* v;
  const int64_t* positions;                                         // [B, S] contiguous
  int64_t cache_batch_stride, cache_row_stride, cache_head_stride;  // head dim contiguous
  int64_t new_batch_stride, new_row_stride, new_head_stride;        // same for k and v
  int batch, steps, heads, head_dim;
  int64_t capacity;
  int element_bytes;  // 2 (bf16/fp16) or 4 (fp32)
};

cudaError_t kv_cache_write_cuda(const KvWriteParams& p, cudaStream_t stream);

}  // namespace pearlmoe::attention
