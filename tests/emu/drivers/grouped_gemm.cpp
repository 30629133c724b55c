// Emulated grouped_gemm_sm80 (both tiles, SwiGLU epilogue, row gather):
//   a [rows, K] (row stride lda), a_rows [M] or none, b [G, N, K], group_offsets [G + 1]
//   -> c [M, N] (or [M, N/2] with SwiGLU).
#include "kernels/moe_gemm/grouped_gemm_sm80.cu"

#include "driver.h"

using namespace pearlmoe::moe_gemm;

int main(int argc, char** argv) {
  emu_driver::Case c(argc, argv);
  const GroupedGemmParams p{c.in("a"),
                            c.i64("lda"),
                            c.in<int32_t>("a_rows"),
                            c.in("b"),
                            c.in<int32_t>("group_offsets"),
                            c.out("c"),
                            c.i64("m"),
                            c.i64("n"),
                            c.i64("k"),
                            static_cast<int>(c.i64("groups")),
                            c.i64("dtype") == 0 ? DType::kBF16 : DType::kFP16,
                            c.i64("swiglu") ? Epilogue::kSwiGLU : Epilogue::kNone};
  return c.finish(grouped_gemm_sm80(p, nullptr));
}
