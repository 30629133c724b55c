// Shared pieces of the CUDA microbenchmarks: error checking and a main() that exits cleanly
// where no GPU is present (CI builds and runs the binaries without one).
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK_CUDA(expr)                                                                           \
  do {                                                                                             \
    cudaError_t err_ = (expr);                                                                     \
    if (err_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

// Times launch() per benchmark iteration between two CUDA events (Google Benchmark's manual
// time), after one warm-up launch. With scrub_l2 a memset of twice the L2 size runs before each
// timed launch, so small kernels are measured cold (as nvbench and llm.c do).
template <typename Launch>
void run_timed(benchmark::State& state, Launch&& launch, bool scrub_l2) {
  size_t scrub_bytes = 0;
  void* scrub = nullptr;
  if (scrub_l2) {
    int l2_bytes = 0;
    CHECK_CUDA(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, 0));
    scrub_bytes = 2 * static_cast<size_t>(l2_bytes);
    CHECK_CUDA(cudaMalloc(&scrub, scrub_bytes));
  }
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(launch());  // warm-up
  for (auto _ : state) {
    if (scrub != nullptr) CHECK_CUDA(cudaMemsetAsync(scrub, 0, scrub_bytes));
    CHECK_CUDA(cudaEventRecord(start));
    CHECK_CUDA(launch());
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms / 1e3);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  if (scrub != nullptr) CHECK_CUDA(cudaFree(scrub));
}

inline int run_cuda_benchmarks(int argc, char** argv, const char* name) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("%s: no CUDA device here; nothing to run\n", name);
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
