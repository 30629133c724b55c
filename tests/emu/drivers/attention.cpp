// Emulated attention_cuda (prefill and split-KV kernels, the combine): q [B, Sq, Hq, D], k and v
// [B, C, Hkv, D] (element strides given), kv_lens [B] int32 -> o [B, Sq, Hq, D], with the
// workspace attention_workspace_bytes asks for (garbage-filled) and `num_sms` SMs for the plan.
#include "kernels/attention/attention.cu"

#include "driver.h"

using namespace pearlmoe::attention;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  AttentionParams p{};
  p.q = c.in("q");
  p.k = c.in("k");
  p.v = c.in("v");
  p.o = c.out("o");
  p.kv_lens = c.in<int32_t>("kv_lens");
  p.q_batch_stride = c.i64("q_batch_stride");
  p.q_row_stride = c.i64("q_row_stride");
  p.q_head_stride = c.i64("q_head_stride");
  p.kv_batch_stride = c.i64("kv_batch_stride");
  p.kv_row_stride = c.i64("kv_row_stride");
  p.kv_head_stride = c.i64("kv_head_stride");
  p.batch = static_cast<int>(c.i64("batch"));
  p.q_len = static_cast<int>(c.i64("q_len"));
  p.q_heads = static_cast<int>(c.i64("q_heads"));
  p.kv_heads = static_cast<int>(c.i64("kv_heads"));
  p.head_dim = static_cast<int>(c.i64("head_dim"));
  p.kv_capacity = c.i64("kv_capacity");
  p.scale = static_cast<float>(c.f64("scale"));
  p.dtype = c.i64("dtype") == 0 ? DType::kBF16 : DType::kFP16;
  const int sms = static_cast<int>(c.i64("num_sms"));
  const size_t bytes = attention_workspace_bytes(p, sms);
  std::printf("workspace %zu\n", bytes);
  void* workspace = bytes ? c.scratch(bytes) : nullptr;
  return c.finish(attention_cuda(p, workspace, bytes, sms, nullptr));
}
