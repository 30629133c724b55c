// Emulated moe_align_cuda: topk_ids [N] int32 or int64 -> sorted_slots [N], slot_to_row [N],
// expert_offsets [E + 1], all int32.
#include "kernels/routing/moe_align.cu"

#include "driver.h"

using pearlmoe::routing::moe_align_cuda;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const int64_t slots = c.i64("slots");
  const int experts = static_cast<int>(c.i64("experts"));
  void* workspace = c.scratch(pearlmoe::routing::moe_align_workspace_bytes(slots, experts));
  auto* sorted = c.out<int32_t>("sorted_slots");
  auto* inverse = c.out<int32_t>("slot_to_row");
  auto* offsets = c.out<int32_t>("expert_offsets");
  const cudaError_t status =
      c.i64("id_bytes") == 4 ? moe_align_cuda<int32_t>(c.in<int32_t>("ids"), slots, experts, sorted,
                                                       inverse, offsets, workspace, nullptr)
                             : moe_align_cuda<int64_t>(c.in<int64_t>("ids"), slots, experts, sorted,
                                                       inverse, offsets, workspace, nullptr);
  return c.finish(status);
}
