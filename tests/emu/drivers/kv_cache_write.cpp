// Emulated kv_cache_write_cuda: k, v [B, S, H, D] (strides given) into one cache group
// [B, C, H, D] (strides given) at positions [B, S] int64. The caches come in as inputs and go out
// as outputs, so the test sees what the kernel left untouched too.
#include "kernels/attention/kv_cache_write.cu"

#include "driver.h"

using namespace pearlmoe::attention;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const int64_t bytes = c.i64("cache_bytes");
  void* k_cache = c.out("k_cache");
  void* v_cache = c.out("v_cache");
  std::memcpy(k_cache, c.in("k_cache_in"), static_cast<size_t>(bytes));
  std::memcpy(v_cache, c.in("v_cache_in"), static_cast<size_t>(bytes));
  KvWriteParams p{};
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.k = c.in("k");
  p.v = c.in("v");
  p.positions = c.in<int64_t>("positions");
  p.cache_batch_stride = c.i64("cache_batch_stride");
  p.cache_row_stride = c.i64("cache_row_stride");
  p.cache_head_stride = c.i64("cache_head_stride");
  p.new_batch_stride = c.i64("new_batch_stride");
  p.new_row_stride = c.i64("new_row_stride");
  p.new_head_stride = c.i64("new_head_stride");
  p.batch = static_cast<int>(c.i64("batch"));
  p.steps = static_cast<int>(c.i64("steps"));
  p.heads = static_cast<int>(c.i64("heads"));
  p.head_dim = static_cast<int>(c.i64("head_dim"));
  p.capacity = c.i64("capacity");
  p.element_bytes = static_cast<int>(c.i64("element_bytes"));
  return c.finish(kv_cache_write_cuda(p, nullptr));
}
