// CPU microbenchmark of qlinear's kernel (GGUF Q4_0 / Q4_1 / Q8_0 blocks expanded in registers)
// beside the bf16 skinny GEMM on the same shape, one thread, bf16 x: the decode step's
// projections of a 4-bit model against the same model in bf16.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/moe_gemm/skinny_gemm_cpu.h"
#include "kernels/quant/qlinear_cpu.h"

namespace {

using pearlmoe::moe_gemm::BF16;
using pearlmoe::quant::Format;

constexpr int kCopies = 16;  // cycled through so the weights come from memory, as in decode

std::vector<BF16> random_bf16(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  std::vector<BF16> out(n);
  for (auto& v : out) pearlmoe::moe_gemm::store(&v, dist(rng));
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
  std::vector<std::vector<uint8_t>> w(kCopies, std::vector<uint8_t>(n * row_bytes));
  for (auto& copy : w) {
    for (auto& b : copy) b = static_cast<uint8_t>(rng());
    for (int64_t blk = 0; blk < n * k / 32; ++blk) {  // scale (and min) 0x2000: a small fp16
      uint8_t* p = copy.data() + blk * pearlmoe::quant::block_bytes(format);
      p[0] = 0, p[1] = 0x20;
      if (format == Format::kQ4_1) p[2] = 0, p[3] = 0xa0;
    }
  }
  int i = 0;
  for (auto _ : state) {
    pearlmoe::quant::qlinear_rows(format, x.data(), k, rows, k, w[i++ % kCopies].data(), row_bytes,
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
  std::vector<std::vector<BF16>> w;
  for (int j = 0; j < kCopies; ++j) w.push_back(random_bf16(n * k, rng));
  int i = 0;
  for (auto _ : state) {
    pearlmoe::moe_gemm::skinny_gemm_nt(x.data(), k, rows, k, w[i++ % kCopies].data(), 0, n,
                                       c.data(), n);
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
