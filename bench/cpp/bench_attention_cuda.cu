// CUDA microbenchmark of the decode attention kernel (split-KV) on Hunyuan-Large's head layout:
// 80 query heads, 8 KV heads, head_dim 80, bf16, batch 1 and 8, contexts 4K..256K. Reports the
// K/V bytes read per second. Exits cleanly where no GPU is present.
#include <vector>

#include "cuda_bench_util.h"
#include "kernels/attention/attention.h"

namespace {

using namespace pearlmoe::attention;

constexpr int kQHeads = 80, kKvHeads = 8, kDim = 80;

// args: batch, context
void BM_DecodeAttention(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const int64_t context = state.range(1);
  const size_t kv_elems = static_cast<size_t>(batch) * context * kKvHeads * kDim;
  const size_t q_elems = static_cast<size_t>(batch) * kQHeads * kDim;
  std::vector<uint16_t> host(kv_elems);
  for (size_t i = 0; i < host.size(); ++i) host[i] = 0x3c00 + (i * 2654435761u >> 24) % 64;
  void *q, *k, *v, *o, *lens, *workspace = nullptr;
  CHECK_CUDA(cudaMalloc(&q, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&o, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&k, kv_elems * 2));
  CHECK_CUDA(cudaMalloc(&v, kv_elems * 2));
  CHECK_CUDA(cudaMemcpy(k, host.data(), kv_elems * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(v, host.data(), kv_elems * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(q, host.data(), q_elems * 2, cudaMemcpyHostToDevice));
  std::vector<int32_t> host_lens(batch, static_cast<int32_t>(context));
  CHECK_CUDA(cudaMalloc(&lens, batch * sizeof(int32_t)));
  CHECK_CUDA(cudaMemcpy(lens, host_lens.data(), batch * 4, cudaMemcpyHostToDevice));

  AttentionParams p{q,
                    k,
                    v,
                    o,
                    static_cast<const int32_t*>(lens),
                    kQHeads * kDim,
                    kQHeads * kDim,
                    kDim,  // q strides
                    context * kKvHeads * kDim,
                    kKvHeads * kDim,
                    kDim,  // k/v strides
                    batch,
                    1,
                    kQHeads,
                    kKvHeads,
                    kDim,
                    context,
                    1.f / 8.944272f,
                    DType::kBF16};
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t bytes = attention_workspace_bytes(p, sms);
  if (bytes) CHECK_CUDA(cudaMalloc(&workspace, bytes));

  run_timed(
      state, [&] { return attention_cuda(p, workspace, bytes, sms, nullptr); },
      /*scrub_l2=*/false);  // a 256K context is far larger than L2
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(2 * kv_elems * 2));
  for (void* ptr : {q, k, v, o, lens, workspace}) cudaFree(ptr);
}

BENCHMARK(BM_DecodeAttention)
    ->ArgNames({"B", "L"})
    ->ArgsProduct({{1, 8}, {4096, 32768, 131072, 262144}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) { return run_cuda_benchmarks(argc, argv, "bench_attention_cuda"); }
