// Emulated rope_norm_cuda: x [T, H, D] (token and head strides) at positions [T] int64, optional
// weight [D] f32, inv_freq [D/2] f32 (passed by value) -> out [T, H, D].
#include "kernels/attention/rope_norm.cu"

#include "driver.h"

using namespace pearlmoe::attention;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const int64_t dtype = c.i64("dtype");
  RopeInvFreq table{};
  const int64_t half = c.i64("head_dim") / 2;
  for (int64_t i = 0; i < half && i < kRopeMaxHeadDim / 2; ++i)
    table.v[i] = c.in<float>("inv_freq")[i];
  const RopeNormParams p{c.in("x"),
                         c.out("out"),
                         c.in<int64_t>("positions"),
                         c.in<float>("weight"),
                         table,
                         c.i64("tokens"),
                         c.i64("heads"),
                         c.i64("head_dim"),
                         c.i64("token_stride"),
                         c.i64("head_stride"),
                         static_cast<float>(c.f64("eps")),
                         c.i64("normalize") != 0,
                         dtype == 0   ? RopeDType::kF32
                         : dtype == 1 ? RopeDType::kBF16
                                      : RopeDType::kF16};
  return c.finish(rope_norm_cuda(p, nullptr));
}
