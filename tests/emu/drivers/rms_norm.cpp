// Emulated rms_norm_cuda: x [rows, H] (row stride given, unit last stride), weight [H] in x's dtype
// (0 fp32, 1 bf16, 2 fp16) -> out [rows, H] contiguous.
#include "kernels/norm/rms_norm.cu"

#include "driver.h"

using namespace pearlmoe::norm;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const int64_t dtype = c.i64("dtype");
  RmsNormParams p{};
  p.x = c.in("x");
  p.weight = c.in("weight");
  p.out = c.out("out");
  p.rows = c.i64("rows");
  p.hidden = c.i64("hidden");
  p.x_row_stride = c.i64("row_stride");
  p.eps = static_cast<float>(c.f64("eps"));
  p.dtype = dtype == 0 ? DType::kF32 : dtype == 1 ? DType::kBF16 : DType::kF16;
  return c.finish(rms_norm_cuda(p, nullptr));
}
