// Emulated attention_cuda (prefill and split-KV kernels, the combine): q [B, Sq, Hq, D], k and v
// [B, C, Hkv, D] (element strides given), kv_lens [B] int32 -> o [B, Sq, Hq, D], with the
// workspace attention_workspace_bytes asks for (garbage-filled) and `num_sms` SMs for the plan.
// Prints the plan; with plan_only = 1 it launches nothing and prints, for each length in
// plan_lens, how split_tiles spreads that many keys: "spread LEN BUSY_SPLITS MAX_TILES".
#include "kernels/attention/attention.cu"

#include "driver.h"

using namespace pearlmoe::attention;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  AttentionParams p{};
  p.q = c.in("q");
  p.k = c.in("k");
  p.v = c.in("v");
  p.o = c.has("plan_only") ? nullptr : c.out("o");
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
  const AttentionPlan plan = attention_plan(p, sms);
  std::printf("plan %d %d %d %d %d %u %u %u %zu\n", plan.prefill, plan.splits, plan.warps_m,
              plan.m_groups, plan.min_split_tiles, plan.grid[0], plan.grid[1], plan.grid[2],
              plan.workspace_bytes);
  if (c.has("plan_only")) {
    std::istringstream lens(c.text("plan_lens"));
    for (std::string len; std::getline(lens, len, ',');) {
      int busy = 0, widest = 0;
      for (int s = 0; s < plan.splits; ++s) {
        int begin, end;
        split_tiles(std::stoi(len), s, plan.splits, plan.min_split_tiles, &begin, &end);
        busy += end > begin;
        widest = std::max(widest, end - begin);
      }
      std::printf("spread %s %d %d\n", len.c_str(), busy, widest);
    }
    return c.finish(cudaSuccess);
  }
  const size_t bytes = attention_workspace_bytes(p, sms);
  void* workspace = bytes ? c.scratch(bytes) : nullptr;
  return c.finish(attention_cuda(p, workspace, bytes, sms, nullptr));
}
