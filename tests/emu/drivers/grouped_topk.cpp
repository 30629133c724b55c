// Emulated grouped_topk_cuda: logits [T, E] (row stride), bias [E] or none -> weights [T, k] f32,
// ids [T, k] int32.
#include "kernels/routing/grouped_topk.cu"

#include "driver.h"

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const cudaError_t status = pearlmoe::routing::grouped_topk_cuda(
      c.in<float>("logits"), c.i64("row_stride"), c.in<float>("bias"), c.i64("tokens"),
      static_cast<int>(c.i64("experts")), static_cast<int>(c.i64("k")),
      static_cast<int>(c.i64("groups")), static_cast<int>(c.i64("topk_groups")),
      c.i64("renormalize") != 0, static_cast<float>(c.f64("scaling")), c.out<float>("weights"),
      c.out<int32_t>("ids"), nullptr);
  return c.finish(status);
}
