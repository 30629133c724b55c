// CPU microbenchmark of the skinny GEMM (a few rows against an expert weight), one thread:
// the decode-sized path of the CPU expert FFN.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/moe_gemm/skinny_gemm_cpu.h"

namespace {

using pearlmoe::moe_gemm::skinny_gemm_nt;

// args: rows, N, K. Cycles through enough weight copies to miss the caches, as real decode does.
void BM_SkinnyGemm(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1), k = state.range(2);
  constexpr int kCopies = 16;
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  std::vector<float> a(rows * k), c(rows * n);
  std::vector<std::vector<float>> b(kCopies, std::vector<float>(n * k));
  for (auto& v : a) v = dist(rng);
  for (auto& w : b) {
    for (auto& v : w) v = dist(rng);
  }
  int i = 0;
  for (auto _ : state) {
    skinny_gemm_nt(a.data(), k, rows, k, b[i++ % kCopies].data(), 0, n, c.data(), n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * k * 4);  // weight bytes streamed
}

BENCHMARK(BM_SkinnyGemm)
    ->ArgNames({"rows", "N", "K"})
    ->Args({1, 2048, 512})
    ->Args({4, 2048, 512})
    ->Args({1, 1024, 1024});

}  // namespace

BENCHMARK_MAIN();
