// CUDA microbenchmarks of the grouped GEMM kernels on Hunyuan-Large expert shapes: the
// handwritten mma.sync kernel (decode and prefill tiles) and, on sm_90a, the CUTLASS kernel.
// Rows are spread evenly over the groups (T tokens, top-1). Exits cleanly where no GPU is present.
#include "cuda_bench_util.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/moe_gemm/grouped_gemm.h"

namespace {

using namespace pearlmoe::moe_gemm;

// One problem's buffers, filled with small non-zero values (zeros can run faster than real data).
struct Problem {
  GroupedGemmParams p{};
  int active_groups = 0;
  std::vector<void*> buffers;

  Problem(int64_t tokens, int groups, int64_t n, int64_t k, Epilogue epilogue) {
    std::vector<int32_t> offs(groups + 1, 0);
    for (int g = 0; g < groups; ++g) {
      offs[g + 1] = offs[g] + static_cast<int32_t>(tokens / groups + (g < tokens % groups));
      active_groups += offs[g + 1] > offs[g];
    }
    const int64_t out_cols = epilogue == Epilogue::kSwiGLU ? n / 2 : n;
    void* a = alloc_random(tokens * k * 2);
    void* b = alloc_random(groups * n * k * 2);
    void* c = alloc_random(tokens * out_cols * 2);
    void* d_offs = nullptr;
    CHECK_CUDA(cudaMalloc(&d_offs, offs.size() * sizeof(int32_t)));
    CHECK_CUDA(cudaMemcpy(d_offs, offs.data(), offs.size() * 4, cudaMemcpyHostToDevice));
    buffers = {a, b, c, d_offs};
    p = {a, k,      nullptr,      b,       static_cast<int32_t*>(d_offs), c, tokens, n,
         k, groups, DType::kBF16, epilogue};
  }
  ~Problem() {
    for (void* ptr : buffers) cudaFree(ptr);
  }

  static void* alloc_random(int64_t bytes) {
    std::vector<uint16_t> host(bytes / 2);
    for (size_t i = 0; i < host.size(); ++i) host[i] = 0x3c00 + (i * 2654435761u >> 24) % 64;
    void* ptr = nullptr;
    CHECK_CUDA(cudaMalloc(&ptr, bytes + 16));
    CHECK_CUDA(cudaMemcpy(ptr, host.data(), bytes, cudaMemcpyHostToDevice));
    return ptr;
  }
};

// Weight-streaming GEMMs far larger than L2: timed warm, as CUTLASS's profiler does.
template <typename Launch>
void time_it(benchmark::State& state, const Problem& prob, Launch&& launch) {
  run_timed(state, launch, /*scrub_l2=*/false);
  const auto& p = prob.p;
  state.counters["weights_GBps"] =
      benchmark::Counter(static_cast<double>(prob.active_groups) * p.n * p.k * 2,
                         benchmark::Counter::kIsIterationInvariantRate);
  state.counters["TFLOPs"] = benchmark::Counter(2.0 * p.m * p.n * p.k / 1e12,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

// args: tokens, groups, N, K, swiglu
void BM_GroupedGemmSm80(benchmark::State& state) {
  Problem prob(state.range(0), static_cast<int>(state.range(1)), state.range(2), state.range(3),
               state.range(4) ? Epilogue::kSwiGLU : Epilogue::kNone);
  time_it(state, prob, [&] { return grouped_gemm_sm80(prob.p, nullptr); });
}

void BM_GroupedGemmSm90(benchmark::State& state) {
  Problem prob(state.range(0), static_cast<int>(state.range(1)), state.range(2), state.range(3),
               Epilogue::kNone);
  int major = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  if (major != 9 || !grouped_gemm_sm90_supported(prob.p)) {
    state.SkipWithError("needs an sm_90a build on a Hopper GPU");
    return;
  }
  const size_t bytes = grouped_gemm_sm90_workspace_bytes(prob.p);
  void* workspace = nullptr;
  CHECK_CUDA(cudaMalloc(&workspace, bytes));
  time_it(state, prob, [&] { return grouped_gemm_sm90(prob.p, workspace, bytes, nullptr); });
  CHECK_CUDA(cudaFree(workspace));
}

// Hunyuan-Large: 16 experts, gate/up N = 2 * 18304, K = 6400; down N = 6400, K = 18304.
void Shapes(benchmark::internal::Benchmark* b, bool swiglu_variants) {
  b->ArgNames({"T", "G", "N", "K", "swiglu"})->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (int64_t tokens : {1, 8, 64, 512, 4096}) {
    b->Args({tokens, 16, 36608, 6400, 0});
    if (swiglu_variants) b->Args({tokens, 16, 36608, 6400, 1});
    b->Args({tokens, 16, 6400, 18304, 0});
  }
}

BENCHMARK(BM_GroupedGemmSm80)->Apply([](auto* b) { Shapes(b, true); });
BENCHMARK(BM_GroupedGemmSm90)->Apply([](auto* b) { Shapes(b, false); });

}  // namespace

int main(int argc, char** argv) { return run_cuda_benchmarks(argc, argv, "bench_moe_gemm_cuda"); }
