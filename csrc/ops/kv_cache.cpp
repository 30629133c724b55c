// kv_cache_write: append the new tokens' keys and values to a KV cache at given positions, in
// place. An op of its own so that a compiled decode step mutates the cache where it lies (an
// index_put_ on a view of the cache makes torch.compile copy the whole buffer every step) and a
// CUDA graph can capture the write.
#include <torch/library.h>

#include "../cpu/cpu_kernels.h"
#include "checks.h"
#include "ops.h"

#ifdef PEARLMOE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/attention/kv_cache_write.h"
#endif

namespace pearlmoe {
namespace {

using at::Tensor;
constexpr const char* kWrite = "kv_cache_write";

void check_kv_write(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                    const Tensor& positions, int64_t group) {
  check_dim(k_cache, 5, kWrite, "k_cache");
  PM_CHECK(v_cache.sizes() == k_cache.sizes(), kWrite, "v_cache must have k_cache's shape ",
           k_cache.sizes(), ", got ", v_cache.sizes());
  check_dim(k, 4, kWrite, "k");
  PM_CHECK(v.sizes() == k.sizes(), kWrite, "v must have k's shape ", k.sizes(), ", got ",
           v.sizes());
  check_dim(positions, 2, kWrite, "positions");
  check_dtype(positions, at::kLong, kWrite, "positions");
  PM_CHECK(at::isFloatingType(k_cache.scalar_type()), kWrite,
           "k_cache must be floating point, got ", k_cache.scalar_type());
  for (auto [t, name] : {std::pair{&v_cache, "v_cache"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    PM_CHECK(t->scalar_type() == k_cache.scalar_type(), kWrite, name, " must have k_cache's dtype ",
             k_cache.scalar_type(), ", got ", t->scalar_type());
  }
  for (auto [t, name] : {std::pair{&v_cache, "v_cache"}, std::pair{&k, "k"}, std::pair{&v, "v"},
                         std::pair{&positions, "positions"}}) {
    PM_CHECK(t->device() == k_cache.device(), kWrite, name, " is on ", t->device(),
             " but k_cache is on ", k_cache.device());
  }
  const int64_t groups = k_cache.size(0), batch = k_cache.size(1);
  PM_CHECK(group >= 0 && group < groups, kWrite, "group must be in [0, ", groups, "), got ", group);
  PM_CHECK(k.size(0) == batch && k.size(2) == k_cache.size(3) && k.size(3) == k_cache.size(4),
           kWrite, "k must be [B, S, Hkv, D] = [", batch, ", S, ", k_cache.size(3), ", ",
           k_cache.size(4), "] for k_cache of shape ", k_cache.sizes(), ", got ", k.sizes());
  PM_CHECK(positions.size(0) == batch && positions.size(1) == k.size(1), kWrite,
           "positions must be [B, S] = [", batch, ", ", k.size(1), "], got ", positions.sizes());
  PM_CHECK(
      k_cache.stride(4) == 1 && v_cache.stride(4) == 1 && k_cache.strides() == v_cache.strides(),
      kWrite, "k_cache and v_cache must share strides with a contiguous head dim, got ",
      k_cache.strides(), " and ", v_cache.strides());
}

void kv_cache_write_cpu(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_in,
                        const Tensor& v_in, const Tensor& positions_in, int64_t group) {
  check_device(k_cache, c10::kCPU, kWrite, "k_cache");
  check_kv_write(k_cache, v_cache, k_in, v_in, positions_in, group);
  const Tensor positions = positions_in.contiguous();  // read once, through one copy
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(2);
  for (int64_t i = 0; i < positions.numel(); ++i) {
    PM_CHECK(pos[i] >= 0 && pos[i] < capacity, kWrite, "positions[", i / positions.size(1), ", ",
             i % positions.size(1), "] = ", pos[i], " is outside the cache's capacity [0, ",
             capacity, ")");
  }
  Tensor kc = k_cache.select(0, group), vc = v_cache.select(0, group);
  cpu::kv_cache_write(k_in.contiguous(), v_in.contiguous(), pos, kc, vc);
}

#ifdef PEARLMOE_WITH_CUDA
void kv_cache_write_cuda(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_in,
                         const Tensor& v_in, const Tensor& positions_in, int64_t group) {
  check_device(k_cache, c10::kCUDA, kWrite, "k_cache");
  check_kv_write(k_cache, v_cache, k_in, v_in, positions_in, group);
  const int64_t bytes = k_cache.element_size();
  PM_CHECK(k_cache.size(4) * bytes % 4 == 0, kWrite,
           "the head dim must span a multiple of 4 bytes "
           "on CUDA, got ",
           k_cache.size(4), " elements of ", bytes, " bytes");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const Tensor k =
      k_in.stride(3) == 1 && k_in.strides() == v_in.strides() ? k_in : k_in.contiguous();
  const Tensor v = k.is_same(k_in) ? v_in : v_in.contiguous();
  const Tensor positions = positions_in.contiguous();
  attention::KvWriteParams p{};
  p.k_cache = k_cache.select(0, group).data_ptr();
  p.v_cache = v_cache.select(0, group).data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.positions = positions.const_data_ptr<int64_t>();
  p.cache_batch_stride = k_cache.stride(1);
  p.cache_row_stride = k_cache.stride(2);
  p.cache_head_stride = k_cache.stride(3);
  p.new_batch_stride = k.stride(0);
  p.new_row_stride = k.stride(1);
  p.new_head_stride = k.stride(2);
  p.batch = static_cast<int>(k.size(0));
  p.steps = static_cast<int>(k.size(1));
  p.heads = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(k.size(3));
  p.capacity = k_cache.size(2);
  p.element_bytes = static_cast<int>(bytes);
  check_launch(attention::kv_cache_write_cuda(p, c10::cuda::getCurrentCUDAStream().stream()),
               kWrite);
}
#else
void kv_cache_write_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         int64_t) {
  fail_no_cuda(kWrite);
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, CPU, m) { m.impl("kv_cache_write", &kv_cache_write_cpu); }
TORCH_LIBRARY_IMPL(pearlmoe, CUDA, m) { m.impl("kv_cache_write", &kv_cache_write_cuda); }

}  // namespace pearlmoe
