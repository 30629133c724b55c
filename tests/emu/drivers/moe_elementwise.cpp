// Emulated MoE elementwise kernels (op: 0 silu_and_mul, 1 moe_combine, 2 zero_tail_rows).
#include "kernels/moe_gemm/moe_elementwise.cu"

#include "driver.h"

using namespace pearlmoe::moe_gemm;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const DType dtype = c.i64("dtype") == 0 ? DType::kBF16 : DType::kFP16;
  cudaError_t status = cudaErrorInvalidValue;
  switch (c.i64("op")) {
    case 0:  // h [rows, 2I] -> out [rows, I], rows below *routed_rows (if given)
      status = silu_and_mul(c.in("h"), c.out("out"), c.i64("rows"), c.i64("inter"),
                            c.in<int32_t>("routed_rows"), dtype, nullptr);
      break;
    case 1:  // expert_out [M, H], weights [T, k], slot_to_row [T k], offsets, shared -> y [T, H]
      status = moe_combine(c.in("expert_out"), c.in<float>("weights"), c.in<int32_t>("slot_to_row"),
                           c.in<int32_t>("group_offsets"), static_cast<int>(c.i64("groups")),
                           c.in("shared"), c.out("y"), c.i64("tokens"),
                           static_cast<int>(c.i64("top_k")), c.i64("hidden"), dtype, nullptr);
      break;
    case 2: {  // zero rows offsets[G].. of c [m, cols] (c given as input, returned as output)
      const int64_t bytes = c.i64("m") * c.i64("cols") * 2;
      void* out = c.out("c");
      std::memcpy(out, c.in("c_in"), static_cast<size_t>(bytes));
      status = zero_tail_rows(out, c.i64("m"), c.i64("cols"), c.in<int32_t>("group_offsets"),
                              static_cast<int>(c.i64("groups")), dtype, nullptr);
      break;
    }
  }
  return c.finish(status);
}
