// KV-cache append: one thread block per (token, head) row pair of k and v; the head dim is copied
// in 4-byte words (D * element size is a multiple of 4 for every supported head dim).
#include "kv_cache_write.h"

#include "../launch.cuh"

namespace pearlmoe::attention {
namespace {

constexpr int kThreads = 64;

__global__ void kv_cache_write_kernel(KvWriteParams p) {
  const int64_t row = blockIdx.x;  // (b, s, h)
  const int h = static_cast<int>(row % p.heads);
  const int64_t bs = row / p.heads;
  const int s = static_cast<int>(bs % p.steps);
  const int b = static_cast<int>(bs / p.steps);
  const int64_t pos = p.positions[static_cast<int64_t>(b) * p.steps + s];
  if (pos < 0 || pos >= p.capacity) return;  // out of range: skipped, never written
  const int64_t src =
      (b * p.new_batch_stride + s * p.new_row_stride + h * p.new_head_stride) * p.element_bytes;
  const int64_t dst =
      (b * p.cache_batch_stride + pos * p.cache_row_stride + h * p.cache_head_stride) *
      p.element_bytes;
  const int words = p.head_dim * p.element_bytes / 4;
  const auto* k = reinterpret_cast<const uint32_t*>(static_cast<const char*>(p.k) + src);
  const auto* v = reinterpret_cast<const uint32_t*>(static_cast<const char*>(p.v) + src);
  auto* kc = reinterpret_cast<uint32_t*>(static_cast<char*>(p.k_cache) + dst);
  auto* vc = reinterpret_cast<uint32_t*>(static_cast<char*>(p.v_cache) + dst);
  for (int i = threadIdx.x; i < words; i += kThreads) {
    kc[i] = k[i];
    vc[i] = v[i];
  }
}

}  // namespace

cudaError_t kv_cache_write_cuda(const KvWriteParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.steps * p.heads;
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff || (p.head_dim * p.element_bytes) % 4 != 0) return cudaErrorInvalidValue;
  return launch_kernel(&kv_cache_write_kernel, static_cast<unsigned>(rows), kThreads, 0, stream, p);
}

}  // namespace pearlmoe::attention
