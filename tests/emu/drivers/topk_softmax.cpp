// Emulated topk_softmax_cuda: logits [T, E] (row stride) -> weights [T, k] f32, ids [T, k] int32.
#include "kernels/routing/topk_softmax.cu"

#include "driver.h"

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const cudaError_t status = pearlmoe::routing::topk_softmax_cuda(
      c.in<float>("logits"), c.i64("row_stride"), c.i64("tokens"),
      static_cast<int>(c.i64("experts")), static_cast<int>(c.i64("k")), c.i64("renormalize") != 0,
      c.out<float>("weights"), c.out<int32_t>("ids"), nullptr);
  return c.finish(status);
}
