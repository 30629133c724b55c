// Emulated spec_verify_cuda: target_probs [B, n+1, V], draft_ids [B, n] int64, draft_probs
// [B, n, V] and uniforms [B, n+1] (sampling = 1) -> tokens [B, n+1] int64, num_accepted [B] int32.
#include "kernels/spec_decode/spec_verify.cu"

#include "driver.h"

using namespace pearlmoe::spec_decode;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const SpecVerifyParams p{c.in<float>("target_probs"),
                           c.in<int64_t>("draft_ids"),
                           c.in<float>("draft_probs"),
                           c.in<float>("uniforms"),
                           c.out<int64_t>("tokens"),
                           c.out<int32_t>("num_accepted"),
                           c.i64("batch"),
                           c.i64("num_drafts"),
                           c.i64("vocab"),
                           c.i64("sampling") != 0};
  return c.finish(spec_verify_cuda(p, nullptr));
}
