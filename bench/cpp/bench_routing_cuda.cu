// CUDA microbenchmarks of the torch-free routing kernels: cudaEvent timing fed to Google
// Benchmark's manual time, with L2 flushed before every iteration (as nvbench / llm.c do).
// Exits cleanly where no GPU is present, so CI can build and run it.
#include "cuda_bench_util.h"

#include <cstdio>
#include <random>
#include <vector>

#include "kernels/routing/routing.h"

namespace {

using pearlmoe::routing::moe_align_cuda;
using pearlmoe::routing::moe_align_workspace_bytes;
using pearlmoe::routing::topk_softmax_cuda;

template <typename T>
T* device_alloc(size_t count) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, count * sizeof(T) + 1));
  return p;
}

// args: tokens, experts, k
void BM_TopkSoftmaxCuda(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const int experts = static_cast<int>(state.range(1));
  const int k = static_cast<int>(state.range(2));
  std::vector<float> host(tokens * experts);
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  for (auto& v : host) v = dist(rng);
  float* logits = device_alloc<float>(host.size());
  float* weights = device_alloc<float>(tokens * k);
  int32_t* ids = device_alloc<int32_t>(tokens * k);
  CHECK_CUDA(cudaMemcpy(logits, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
  run_timed(
      state,
      [&] {
        return topk_softmax_cuda(logits, experts, tokens, experts, k, false, weights, ids, nullptr);
      },
      /*scrub_l2=*/true);
  state.SetItemsProcessed(state.iterations() * tokens);
  state.SetBytesProcessed(state.iterations() * tokens * (experts * 4 + k * 8));
  CHECK_CUDA(cudaFree(logits));
  CHECK_CUDA(cudaFree(weights));
  CHECK_CUDA(cudaFree(ids));
}

// args: tokens, experts, k
void BM_MoeAlignCuda(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const int experts = static_cast<int>(state.range(1));
  const int64_t slots = tokens * state.range(2);
  std::vector<int32_t> host(slots);
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> dist(0, experts - 1);
  for (auto& v : host) v = dist(rng);
  int32_t* ids = device_alloc<int32_t>(slots);
  int32_t* sorted = device_alloc<int32_t>(slots);
  int32_t* inverse = device_alloc<int32_t>(slots);
  int32_t* offsets = device_alloc<int32_t>(experts + 1);
  void* workspace = device_alloc<char>(moe_align_workspace_bytes(slots, experts));
  CHECK_CUDA(cudaMemcpy(ids, host.data(), slots * 4, cudaMemcpyHostToDevice));
  run_timed(
      state,
      [&] {
        return moe_align_cuda(ids, slots, experts, sorted, inverse, offsets, workspace, nullptr);
      },
      /*scrub_l2=*/true);
  state.SetItemsProcessed(state.iterations() * slots);
  for (void* p : {static_cast<void*>(ids), static_cast<void*>(sorted), static_cast<void*>(inverse),
                  static_cast<void*>(offsets), workspace}) {
    CHECK_CUDA(cudaFree(p));
  }
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "k"})->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (int64_t tokens : {1, 64, 4096, 65536}) {
    b->Args({tokens, 16, 1});   // Hunyuan-Large: top-1 of 16
    b->Args({tokens, 256, 8});  // many fine-grained experts
  }
}

BENCHMARK(BM_TopkSoftmaxCuda)->Apply(Shapes);
BENCHMARK(BM_MoeAlignCuda)->Apply(Shapes);

}  // namespace

int main(int argc, char** argv) { return run_cuda_benchmarks(argc, argv, "bench_routing_cuda"); }
