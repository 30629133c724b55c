// CPU microbenchmarks of the torch-free routing kernels (single thread: the op parallelises
// rows with at::parallel_for on top of these).
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/routing/routing_cpu.h"

namespace {

using pearlmoe::routing::moe_align;
using pearlmoe::routing::topk_softmax_row;

std::vector<float> random_logits(int64_t n) {
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

// args: tokens, experts, k
void BM_TopkSoftmax(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const int experts = static_cast<int>(state.range(1));
  const int k = static_cast<int>(state.range(2));
  const auto logits = random_logits(tokens * experts);
  std::vector<float> weights(tokens * k);
  std::vector<int32_t> ids(tokens * k);
  for (auto _ : state) {
    for (int64_t t = 0; t < tokens; ++t) {
      topk_softmax_row(logits.data() + t * experts, experts, k, false, weights.data() + t * k,
                       ids.data() + t * k);
    }
    benchmark::DoNotOptimize(weights.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * tokens);
  state.SetBytesProcessed(state.iterations() * tokens * (experts * 4 + k * 8));
}

// args: tokens, experts, k
void BM_MoeAlign(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const int experts = static_cast<int>(state.range(1));
  const int64_t slots = tokens * state.range(2);
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> dist(0, experts - 1);
  std::vector<int32_t> ids(slots), sorted(slots), inverse(slots), offsets(experts + 1),
      counts(experts + 1);
  for (auto& v : ids) v = dist(rng);
  for (auto _ : state) {
    benchmark::DoNotOptimize(moe_align(ids.data(), slots, experts, sorted.data(), inverse.data(),
                                       offsets.data(), counts.data()));
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * slots);
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "k"});
  for (int64_t tokens : {1, 64, 4096}) {
    b->Args({tokens, 16, 1});   // Hunyuan-Large: top-1 of 16
    b->Args({tokens, 256, 8});  // many fine-grained experts
  }
}

BENCHMARK(BM_TopkSoftmax)->Apply(Shapes);
BENCHMARK(BM_MoeAlign)->Apply(Shapes);

}  // namespace

BENCHMARK_MAIN();
