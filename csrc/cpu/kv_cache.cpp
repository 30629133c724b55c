// CPU KV-cache append: one head-dim row copy per (sequence, new token, KV head).
#include <ATen/Parallel.h>

#include <cstring>

#include "cpu_kernels.h"

namespace pearlmoe::cpu {

void kv_cache_write(const at::Tensor& k, const at::Tensor& v, const int64_t* positions,
                    at::Tensor& k_cache, at::Tensor& v_cache) {
  const int64_t batch = k.size(0), steps = k.size(1), heads = k.size(2), dim = k.size(3);
  const int64_t row_bytes = dim * k.element_size();
  const auto* ks = static_cast<const char*>(k.const_data_ptr());
  const auto* vs = static_cast<const char*>(v.const_data_ptr());
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t es = k.element_size();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t pos = positions[b * steps + s];
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t src = ((b * steps + s) * heads + h) * dim * es;
        const int64_t dst =
            (b * k_cache.stride(0) + pos * k_cache.stride(1) + h * k_cache.stride(2)) * es;
        std::memcpy(kc + dst, ks + src, row_bytes);
        std::memcpy(vc + dst, vs + src, row_bytes);
      }
    }
  }
}

}  // namespace pearlmoe::cpu
