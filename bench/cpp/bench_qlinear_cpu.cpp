// CPU microbenchmark of qlinear's kernel (GGUF Q4_0 / Q4_1 / Q8_0 blocks expanded in registers)
// beside the bf16 skinny GEMM on the same shape, one thread, bf16 x: the decode step's
// projections of a 4-bit model against the same model in bf16.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>
#include <vector>

#include "kernels/moe_gemm/skinny_gemm_cpu.h"
#include "kernels/quant/qlinear_cpu.h"

namespace {

using pearlmoe::moe_gemm::BF16;
using pearlmoe::quant::Format;

// Copies of the weights cycled through so they come from memory, as in decode: enough for
// 128 MiB (past any L3 here), 2 to 16 of them.
int copies_for(int64_t bytes) {
  return static_cast<int>(std::clamp<int64_t>((int64_t{128} << 20) / bytes, 2, 16));
}

// Uniform in [-1, 1) from 24 random bits: the values only have to be finite and varied, and a
// normal distribution over 16 copies of the 49152 x 576 head took half a minute to draw.
std::vector<BF16> random_bf16(int64_t n, std::mt19937& rng) {
  std::vector<BF16> out(n);
  for (auto& v : out) pearlmoe::moe_gemm::store(&v, static_cast<float>(rng() >> 8) * 0x1p-23f - 1);
  return out;
}

// args: format (0 q4_0, 1 q4_1, 2 q8_0), rows, N, K.
void BM_QLinear(benchmark::State& state) {
  const auto format = static_cast<Format>(state.range(0));
  const int64_t rows = state.range(1), n = state.range(2), k = state.range(3);
  const int64_t row_bytes = k / 32 * pearlmoe::quant::block_bytes(format);
  std::mt19937 rng(0);
  const std::vector<BF16> x = random_bf16(rows * k, rng);
  std::vector<BF16> c(rows * n);
  std::vector<uint8_t> blocks(n * row_bytes);
  for (auto& b : blocks) b = static_cast<uint8_t>(rng());
  for (int64_t blk = 0; blk < n * k / 32; ++blk) {  // scale (and min) 0x2000: a small fp16
    uint8_t* p = blocks.data() + blk * pearlmoe::quant::block_bytes(format);
    p[0] = 0, p[1] = 0x20;
    if (format == Format::kQ4_1) p[2] = 0, p[3] = 0xa0;
  }
  // Copies in separate memory (their values need not differ).
  const std::vector<std::vector<uint8_t>> w(copies_for(n * row_bytes), blocks);
  const int copies = static_cast<int>(w.size());
  int i = 0;
  for (auto _ : state) {
    pearlmoe::quant::qlinear_rows(format, x.data(), k, rows, k, w[i++ % copies].data(), row_bytes,
                                  0, n, c.data(), n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * row_bytes);  // block bytes streamed
}

// The same shape in bf16 weights: the baseline qlinear replaces.
void BM_SkinnyBf16(benchmark::State& state) {
  const int64_t rows = state.range(1), n = state.range(2), k = state.range(3);
  std::mt19937 rng(0);
  const std::vector<BF16> x = random_bf16(rows * k, rng);
  std::vector<BF16> c(rows * n);
  const std::vector<std::vector<BF16>> w(copies_for(n * k * 2), random_bf16(n * k, rng));
  const int copies = static_cast<int>(w.size());
  int i = 0;
  for (auto _ : state) {
    pearlmoe::moe_gemm::skinny_gemm_nt(x.data(), k, rows, k, w[i++ % copies].data(), 0, n, c.data(),
                                       n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * k * 2);
}

// SmolLM2-135M's projections: q/k/v stacked (960 x 576), the MLP's gate/up (3072 x 576) and
// down (576 x 1536), and the tied head (49152 x 576, Q8_0); one row (decode) and four.
void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"format", "rows", "N", "K"});
  for (int64_t rows : {1, 4}) {
    b->Args({1, rows, 960, 576})->Args({1, rows, 3072, 576})->Args({1, rows, 576, 1536});
    b->Args({0, rows, 3072, 576})->Args({2, rows, 3072, 576});
  }
  b->Args({2, 1, 49152, 576});
}

BENCHMARK(BM_QLinear)->Apply(shapes);
BENCHMARK(BM_SkinnyBf16)->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
