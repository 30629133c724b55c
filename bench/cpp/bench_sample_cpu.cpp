// CPU microbenchmarks of the fused loops' sampler (kernels/spec_decode/sample_cpu.h), one row at a
// time as the loops call it: the distribution of a row of logits (temperature, top-k, top-p) and
// an inverse-CDF draw, beside the same softmax with scalar std::exp (the baseline the AVX-512
// exp replaces). Vocabularies: the embedded pair's 4096 and SmolLM2's 49152.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/spec_decode/sample_cpu.h"

namespace {

namespace sc = pearlmoe::sampling_cpu;

std::vector<float> random_logits(int64_t n) {
  std::mt19937 rng(0);
  std::normal_distribution<float> dist(0.f, 3.f);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

// args: vocab, top_k (0: all), top_p x 100 (100: all)
void BM_Probs(benchmark::State& state) {
  const int64_t vocab = state.range(0);
  const sc::SampleParams params{1.f, state.range(1), static_cast<float>(state.range(2)) / 100.f};
  const auto logits = random_logits(vocab);
  std::vector<float> row(vocab), scratch;
  std::vector<int32_t> order;
  for (auto _ : state) {
    row = logits;
    benchmark::DoNotOptimize(sc::probs_in_place(row.data(), vocab, params, scratch, order));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * vocab * 4);
}

// The baseline: temperature and softmax with scalar std::exp (the path without AVX-512).
void BM_ProbsScalarExp(benchmark::State& state) {
  const int64_t vocab = state.range(0);
  const auto logits = random_logits(vocab);
  std::vector<float> row(vocab);
  for (auto _ : state) {
    row = logits;
    float top = row[0];
    for (float v : row) top = std::max(top, v);
    const float inv = static_cast<float>(
        1.0 / pearlmoe::sampling_cpu::detail::exp_shift_scalar(row.data(), vocab, top));
    for (float& v : row) v *= inv;
    benchmark::DoNotOptimize(row.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * vocab * 4);
}

void BM_Draw(benchmark::State& state) {
  const int64_t vocab = state.range(0);
  auto row = random_logits(vocab);
  std::vector<float> scratch;
  std::vector<int32_t> order;
  sc::probs_in_place(row.data(), vocab, sc::SampleParams{}, scratch, order);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (auto _ : state) benchmark::DoNotOptimize(sc::draw(row.data(), vocab, u(rng)));
  state.SetBytesProcessed(state.iterations() * vocab * 4);
}

}  // namespace

BENCHMARK(BM_Probs)
    ->Args({4096, 0, 100})
    ->Args({4096, 50, 100})
    ->Args({4096, 0, 90})
    ->Args({49152, 0, 100})
    ->Args({49152, 50, 90});
BENCHMARK(BM_ProbsScalarExp)->Arg(4096)->Arg(49152);
BENCHMARK(BM_Draw)->Arg(4096)->Arg(49152);
BENCHMARK_MAIN();
