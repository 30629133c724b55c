// Emulated qlinear_cuda and dequantize_cuda (kernel 0 / 1): x [rows, K] (row stride given, unit
// last stride) in dtype (0 fp32, 1 bf16, 2 fp16), w [N, row_bytes] GGUF blocks of format (0 q4_0,
// 1 q4_1, 2 q8_0) -> out [rows, N], or w expanded to out [N, K].
#include "kernels/quant/qlinear.cu"

#include "driver.h"

using namespace pearlmoe::quant;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const int64_t dtype = c.i64("dtype");
  const DType dt = dtype == 0 ? DType::kF32 : dtype == 1 ? DType::kBF16 : DType::kF16;
  const Format format = static_cast<Format>(c.i64("format"));
  if (c.i64("kernel") == 1) {
    DequantizeParams p{};
    p.w = c.in<const uint8_t>("w");
    p.out = c.out("out");
    p.n = c.i64("n");
    p.k = c.i64("k");
    p.w_row_bytes = c.i64("row_bytes");
    p.format = format;
    p.dtype = dt;
    return c.finish(dequantize_cuda(p, nullptr));
  }
  QLinearParams p{};
  p.x = c.in("x");
  p.w = c.in<const uint8_t>("w");
  p.out = c.out("out");
  p.rows = c.i64("rows");
  p.n = c.i64("n");
  p.k = c.i64("k");
  p.x_row_stride = c.i64("row_stride");
  p.w_row_bytes = c.i64("row_bytes");
  p.format = format;
  p.dtype = dt;
  return c.finish(qlinear_cuda(p, nullptr));
}
